// The C++ half of the PiSSA / OLoRA check against real PEFT (init_reference.py):
//
//   peft_init_tool CASES
//       for each case: initialising the original toy model as the adapter's
//       config says gives PEFT's residual base weights and the base model's
//       logits; the adapter PEFT trained and saved (adapter/, with
//       init_lora_weights "pissa"/"olora") and its plain-LoRA conversion
//       (converted/) load onto the original model and give PEFT's logits. Then
//       an adapter initialised and changed here is saved both ways to
//       CASES/<case>/ours/ with its logits, for PEFT to load.
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

toy::Toy original(const fs::path& dir) {
  toy::Toy model;
  ms::LoadOptions quiet;
  quiet.progress = nullptr;
  ms::load_model_state((dir / "model.safetensors").string(), *ms::identity_mapper_from_module(*model), *model, quiet);
  model->eval();
  return model;
}

at::Tensor logits_of(toy::Toy& model, const at::Tensor& ids) {
  torch::NoGradGuard no_grad;
  return model->forward(ids);
}

int run_case(const fs::path& dir) {
  const std::string name = dir.filename().string();
  std::ifstream in(dir / "case.json");
  const auto info = nlohmann::json::parse(in);
  const uint64_t seed = info.at("seed").get<uint64_t>();
  const at::Tensor ids = ms::SafetensorsFile::open((dir / "inputs.safetensors").string())->get("input_ids");
  const auto expected = ms::SafetensorsFile::open((dir / "expected.safetensors").string());
  const auto residual = ms::SafetensorsFile::open((dir / "residual.safetensors").string());
  std::ifstream config_in(dir / "adapter" / "adapter_config.json");
  const auto config = peft::hf::parse_lora_config(nlohmann::json::parse(config_in), (dir / "adapter").string());

  int failures = 0;
  auto report = [&](const std::string& what, double diff) {
    const bool ok = diff <= kTolerance;
    failures += !ok;
    fmt::print("peft-reference: init {}: {}: {:.2e}: {}\n", name, what, diff, ok ? "ok" : "FAILED");
  };

  // Initialised here: PEFT's residuals, and the base model's logits.
  {
    toy::Toy model = original(dir);
    torch::manual_seed(seed);
    peft::hf::add_adapter(*model, peft::kDefaultAdapterName, config);
    const auto params = model->named_parameters();
    double worst = 0;
    for (const auto& key : residual->keys()) {
      const std::string ours = key.substr(0, key.size() - std::string("weight").size()) + "base.weight";
      worst = std::max(worst, relative_diff(params[ours], residual->get(key)));
    }
    report(fmt::format("{} residual base weights vs PEFT's ({} layers)", info.at("init").get<std::string>(),
                       residual->keys().size()),
           worst);
    report("initialised model vs the base model's logits", relative_diff(logits_of(model, ids), expected->get("base_logits")));
  }
  // PEFT's saved adapters onto the original model.
  for (const char* form : {"adapter", "converted"}) {
    toy::Toy model = original(dir);
    torch::manual_seed(seed);
    peft::hf::load_adapter(*model, (dir / form).string());
    report(fmt::format("PEFT's {} loaded here vs PEFT's logits", form), relative_diff(logits_of(model, ids), expected->get("logits")));
  }
  // Ours: initialise, change, save both ways.
  {
    toy::Toy model = original(dir);
    torch::manual_seed(seed);
    peft::hf::add_adapter(*model, peft::kDefaultAdapterName, config);
    torch::manual_seed(seed + 7);
    {
      torch::NoGradGuard no_grad;
      for (auto& p : model->named_parameters()) {
        if (p.key().find("lora_") != std::string::npos) p.value().add_(0.05 * torch::randn_like(p.value()) * p.value().abs().mean());
      }
    }
    const fs::path ours = dir / "ours";
    peft::hf::save_adapter(*model, (ours / "adapter").string());
    peft::hf::SaveAdapterOptions convert;
    convert.convert_to_lora = true;
    peft::hf::save_adapter(*model, (ours / "converted").string(), convert);
    ms::save_safetensors((ours / "logits.safetensors").string(), {{"logits", logits_of(model, ids).contiguous()}});
    // The converted adapter computes the same on the original model here, too.
    toy::Toy plain = original(dir);
    peft::hf::load_adapter(*plain, (ours / "converted").string());
    report("C++ converted adapter loaded here vs the C++ adapter's logits",
           relative_diff(logits_of(plain, ids), logits_of(model, ids)));
  }
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
      fmt::print("peft-reference: init {}: FAILED: {}\n", dir.filename().string(), e.what());
    }
  }
  if (cases.empty()) {
    fmt::print("peft-reference: init: no cases in {}\n", argv[1]);
    return 1;
  }
  return failures == 0 ? 0 : 1;
}
