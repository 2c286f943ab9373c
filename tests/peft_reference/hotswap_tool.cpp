// The C++ half of the hotswap check against real PEFT (hotswap_reference.py):
//
//   peft_hotswap_tool CASES
//       for each case: load adapter a into the toy model, prepare_for_hotswap
//       where the case asks, hotswap b in; the logits must be PEFT's (its own
//       hotswap where it has one, and b loaded the ordinary way), no adapter
//       tensor may have been replaced; the swapped adapter is saved to
//       CASES/<case>/saved for PEFT to load.
//
// Exit status 0 when every case matched; every failure names its case.
#include "../toy_model.h"

#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>
#include <d9d/peft.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <map>

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
namespace peft = d9d::peft;

namespace {

constexpr double kTolerance = 1e-5;  // of max(1, max |reference|), as the other reference checks

double relative_diff(const at::Tensor& ours, const at::Tensor& reference) {
  if (ours.sizes() != reference.sizes()) return std::numeric_limits<double>::infinity();
  const double diff = (ours.to(at::kDouble) - reference.to(at::kDouble)).abs().max().item<double>();
  return diff / std::max(1.0, reference.abs().max().item<double>());
}

std::map<std::string, std::pair<const void*, const void*>> identities(const torch::nn::Module& model) {
  std::map<std::string, std::pair<const void*, const void*>> out;
  for (const auto& p : model.named_parameters()) {
    out.emplace(p.key(), std::make_pair(static_cast<const void*>(p.value().unsafeGetTensorImpl()),
                                        static_cast<const void*>(p.value().data_ptr())));
  }
  return out;
}

/// Runs one case; returns the number of failed checks.
int run_case(const fs::path& dir) {
  const std::string name = dir.filename().string();
  std::ifstream in(dir / "case.json");
  const auto info = nlohmann::json::parse(in);
  toy::Toy model;
  ms::LoadOptions quiet;
  quiet.progress = nullptr;
  ms::load_model_state((dir / "model.safetensors").string(), *ms::identity_mapper_from_module(*model), *model, quiet);
  model->eval();
  const at::Tensor ids = ms::SafetensorsFile::open((dir / "inputs.safetensors").string())->get("input_ids");
  const auto expected = ms::SafetensorsFile::open((dir / "expected.safetensors").string());

  peft::hf::load_adapter(*model, (dir / "a").string());
  if (!info.at("target_rank").is_null()) peft::prepare_for_hotswap(*model, info.at("target_rank").get<int64_t>());
  const auto before = identities(*model);
  peft::hf::hotswap_adapter(*model, (dir / "b").string());
  at::Tensor logits;
  {
    torch::NoGradGuard no_grad;
    logits = model->forward(ids);
  }
  int failures = 0;
  auto report = [&](const std::string& what, double diff) {
    const bool ok = diff <= kTolerance;
    failures += !ok;
    fmt::print("peft-reference: hotswap {}: {}: {:.2e}: {}\n", name, what, diff, ok ? "ok" : "FAILED");
  };
  report("C++ hotswap vs PEFT loading b", relative_diff(logits, expected->get("logits_b")));
  if (info.at("peft_hotswap").get<bool>()) {
    report("C++ hotswap vs PEFT's hotswap", relative_diff(logits, expected->get("logits_swapped")));
  }
  const bool same = identities(*model) == before;
  failures += !same;
  fmt::print("peft-reference: hotswap {}: every parameter the same tensor and storage: {}\n", name,
             same ? "ok" : "FAILED");
  peft::hf::save_adapter(*model, (dir / "saved").string());
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    fmt::print(stderr, "usage: {} CASES\n", argv[0]);
    return 2;
  }
  int failures = 0;
  std::vector<fs::path> cases;
  for (const auto& entry : fs::directory_iterator(argv[1])) {
    if (fs::exists(entry.path() / "case.json")) cases.push_back(entry.path());
  }
  std::sort(cases.begin(), cases.end());
  for (const auto& dir : cases) {
    try {
      failures += run_case(dir);
    } catch (const std::exception& e) {
      ++failures;
      fmt::print("peft-reference: hotswap {}: FAILED: {}\n", dir.filename().string(), e.what());
    }
  }
  if (cases.empty()) {
    fmt::print("peft-reference: hotswap: no cases in {}\n", argv[1]);
    return 1;
  }
  return failures == 0 ? 0 : 1;
}
