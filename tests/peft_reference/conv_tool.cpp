// LoRA, DoRA, IA3, LoHa, LoKr and OFT on Conv2d layers against real Hugging Face PEFT, both ways.
//
//   peft_conv_tool check CASES [--cli D9D_PEFT]
//       every CASES/conv_* case generate_conv.py wrote is loaded into the C++
//       twin (tests/conv_model.h) with hf::load_adapter: logits with the
//       adapter, merge_peft's logits and weights, and the offline merge (the
//       library's, and `d9d-peft merge` when --cli is given) against PEFT's.
//   peft_conv_tool export OUT --cases CASES
//       for every case, a new adapter with the case's adapter_config.json and
//       weights drawn here (DoRA's magnitude moved off its norm, IA3's vectors
//       around 1, LoHa's and LoKr's factors from N(0, 0.5²), OFT's rotations
//       from N(0, 0.1²), 0.3² with the exact Cayley transform) is saved with
//       hf::save_adapter into OUT/<case>/ with d9d-peft's logits and merged
//       weights (cpp.safetensors), for `generate_conv.py check-exports OUT`.
#include "../conv_model.h"

#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>
#include <d9d/peft.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using nlohmann::json;

namespace {

constexpr double kTolerance = 1e-5;  // relative to max(1, max |reference|)

json read_json(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  return json::parse(in);
}

convnet::Geometry geometry(const fs::path& case_dir) {
  const json j = read_json(case_dir / "net.json");
  convnet::Geometry g;
  g.c0 = j.at("c0"), g.c1 = j.at("c1"), g.c2 = j.at("c2");
  g.k1 = j.at("k1"), g.s1 = j.at("s1"), g.p1 = j.at("p1");
  g.k2 = j.at("k2"), g.s2 = j.at("s2"), g.p2 = j.at("p2"), g.g2 = j.value("g2", 1);
  g.features = j.at("features");
  return g;
}

convnet::ConvNet load_twin(const fs::path& case_dir) {
  convnet::ConvNet net(geometry(case_dir));
  ms::LoadOptions quiet;
  quiet.progress = nullptr;
  ms::load_model_state((case_dir / "model.safetensors").string(), *ms::identity_mapper_from_module(*net), *net, quiet);
  net->eval();
  return net;
}

std::vector<fs::path> cases_under(const fs::path& root) {
  std::vector<fs::path> dirs;
  for (const auto& e : fs::directory_iterator(root)) {
    if (e.is_directory() && e.path().filename().string().rfind("conv_", 0) == 0) dirs.push_back(e.path());
  }
  if (dirs.empty()) throw std::runtime_error("no conv_* cases under " + root.string() + " (run generate_conv.py)");
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

/// Compares and records: the largest absolute difference seen, and failures by name.
struct Verdict {
  double worst = 0;
  std::vector<std::string> failures;
  void expect(const std::string& what, const at::Tensor& ours, const at::Tensor& reference) {
    double diff = std::numeric_limits<double>::infinity();
    if (ours.sizes() == reference.sizes()) {
      diff = (ours.to(at::kDouble) - reference.to(at::kDouble)).abs().max().item<double>();
    }
    worst = std::max(worst, diff);
    const double bound = kTolerance * std::max(1.0, reference.abs().max().item<double>());
    if (!(diff <= bound)) failures.push_back(fmt::format("{}: max abs diff {:.3g}", what, diff));
  }
};

int check(const fs::path& root, const std::string& cli) {
  int failed = 0;
  double worst = 0;
  const auto dirs = cases_under(root);
  for (const auto& dir : dirs) {
    Verdict v;
    try {
      const auto expected = ms::SafetensorsFile::open((dir / "expected.safetensors").string());
      const at::Tensor x = expected->get("x");
      convnet::ConvNet net = load_twin(dir);
      torch::NoGradGuard no_grad;
      const at::Tensor base_logits = net->forward(x);
      auto method = peft::hf::load_adapter(*net, (dir / "adapter").string());
      const at::Tensor logits = net->forward(x);
      // PEFT's OFT on kernels larger than 1x1: its unmerged forward is not its
      // merged model, which is what this library computes (docs/conv.md).
      if (read_json(dir / "net.json").value("unmerged_logits", true)) v.expect("logits", logits, expected->get("logits"));
      if (!((logits - base_logits).abs().max().item<double>() > 1e-3)) {
        v.failures.push_back("the adapter does not change the logits: nothing was compared");
      }
      peft::merge_peft(*method, net);
      v.expect("merged_logits", net->forward(x), expected->get("merged_logits"));
      const auto state = ms::module_state_dict(*net);
      const fs::path out = fs::temp_directory_path() / fmt::format("d9d-conv-check-{}", dir.filename().string());
      fs::remove_all(out);
      peft::hf::merge_adapter_into_checkpoint((dir / "model.safetensors").string(), (dir / "adapter").string(),
                                              (out / "lib").string(), 1.0, ms::no_progress());
      const auto offline = ms::SafetensorsFile::open((out / "lib/model.safetensors").string());
      std::shared_ptr<ms::SafetensorsFile> by_cli;
      if (!cli.empty()) {
        const std::string command = fmt::format("'{}' merge --base '{}' --adapter '{}' --out '{}' > '{}' 2>&1", cli,
                                                (dir / "model.safetensors").string(), (dir / "adapter").string(),
                                                (out / "cli").string(), (out / "cli.log").string());
        if (std::system(command.c_str()) != 0) v.failures.push_back("d9d-peft merge failed: " + command);
        else by_cli = ms::SafetensorsFile::open((out / "cli/model.safetensors").string());
      }
      for (const auto& key : expected->keys()) {
        if (key.rfind("merged.", 0) != 0 || key == "merged_logits") continue;
        const std::string name = key.substr(7);
        v.expect(key, state.at(name), expected->get(key));
        v.expect("offline " + key, offline->get(name), expected->get(key));
        if (by_cli) v.expect("cli " + key, by_cli->get(name), expected->get(key));
      }
      fs::remove_all(out);
    } catch (const std::exception& e) {
      v.failures.push_back(e.what());
    }
    worst = std::max(worst, v.worst);
    std::printf("%s: %s (max abs diff %.3g)\n", dir.filename().string().c_str(),
                v.failures.empty() ? "ok" : fmt::format("FAILED: {}", fmt::join(v.failures, "; ")).c_str(), v.worst);
    failed += !v.failures.empty();
  }
  std::printf("peft-reference: conv: %zu PEFT Conv2d cases checked%s, max abs diff %.3g, %d failed\n", dirs.size(),
              cli.empty() ? "" : " (library, merge and d9d-peft merge)", worst, failed);
  return failed ? 1 : 0;
}

int export_cases(const fs::path& out, const fs::path& cases) {
  const auto dirs = cases_under(cases);
  int index = 0;
  for (const auto& dir : dirs) {
    const fs::path target = out / dir.filename();
    fs::create_directories(target);
    fs::copy_file(dir / "net.json", target / "net.json", fs::copy_options::overwrite_existing);
    fs::copy_file(dir / "model.safetensors", target / "model.safetensors", fs::copy_options::overwrite_existing);
    convnet::ConvNet net = load_twin(dir);
    const at::Tensor x = ms::SafetensorsFile::open((dir / "expected.safetensors").string())->get("x");
    at::Tensor base_logits;
    {
      torch::NoGradGuard no_grad;
      base_logits = net->forward(x);
    }
    const json config_json = read_json(dir / "adapter/adapter_config.json");
    const std::string source = (dir / "adapter").string();
    torch::manual_seed(static_cast<uint64_t>(1000 + index++));
    std::unique_ptr<peft::PeftMethodBase> method;
    if (config_json.at("peft_type") == "IA3") {
      method = std::make_unique<peft::IA3>(peft::hf::parse_ia3_config(config_json, source));
      peft::inject_peft_and_freeze(*method, net);
    } else if (config_json.at("peft_type") == "LOHA") {
      method = std::make_unique<peft::LoHa>(peft::hf::parse_loha_config(config_json, source));
      peft::inject_peft_and_freeze(*method, net);
    } else if (config_json.at("peft_type") == "OFT") {
      method = std::make_unique<peft::OFT>(peft::hf::parse_oft_config(config_json, source));
      peft::inject_peft_and_freeze(*method, net);
    } else if (config_json.at("peft_type") == "LOKR") {
      method = std::make_unique<peft::LoKr>(peft::hf::parse_lokr_config(config_json, source));
      peft::inject_peft_and_freeze(*method, net);
    } else {
      method = peft::hf::add_adapter(*net, peft::kDefaultAdapterName, peft::hf::parse_lora_config(config_json, source));
    }
    // Drawn again (up to 20 times) until the adapter moves the logits by more
    // than 1e-2: a product of random factors can be near zero, and an adapter
    // that changes nothing would compare nothing.
    for (int attempt = 0;; ++attempt) {
      torch::NoGradGuard no_grad;
      for (auto& p : net->named_parameters()) {
        if (p.key().find(".lora_magnitude_vector") != std::string::npos) p.value().mul_(torch::rand_like(p.value()) * 0.6 + 0.7);
        else if (p.key().find(".lora_") != std::string::npos) p.value().normal_(0.0, 0.3);
        else if (p.key().find("ia3_l") != std::string::npos) p.value().normal_(1.0, 0.3);
        else if (p.key().find("hada_") != std::string::npos || p.key().find("lokr_") != std::string::npos) {
          p.value().normal_(0.0, 0.5);
        } else if (p.key().find("oft_R") != std::string::npos) {
          p.value().normal_(0.0, config_json.value("use_cayley_neumann", true) ? 0.1 : 0.3);
        }
      }
      if ((net->forward(x) - base_logits).abs().max().item<double>() > 1e-2) break;
      if (attempt == 19) {
        throw std::runtime_error(dir.filename().string() +
                                 ": 20 draws of the adapter all left the logits within 1e-2 of the base model's");
      }
    }
    peft::hf::save_adapter(*net, (target / "adapter").string());
    ms::StateDict written;
    torch::NoGradGuard no_grad;
    written["x"] = x;
    written["logits"] = net->forward(x);
    peft::merge_peft(*method, net);
    for (const auto& [key, value] : ms::module_state_dict(*net)) {
      written["merged." + key] = value;  // every weight and bias, adapted or not
    }
    ms::save_safetensors((target / "cpp.safetensors").string(), written);
  }
  std::printf("peft-reference: conv: %zu Conv2d adapters exported to %s\n", dirs.size(), out.string().c_str());
  return 0;
}

[[noreturn]] void usage() {
  std::fprintf(stderr, "usage: peft_conv_tool check CASES [--cli D9D_PEFT]\n"
                       "       peft_conv_tool export OUT --cases CASES\n");
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) usage();
  const std::string command = argv[1];
  const fs::path target = argv[2];
  std::string cli, cases;
  for (int i = 3; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) usage();
    if (arg == "--cli") cli = argv[++i];
    else if (arg == "--cases") cases = argv[++i];
    else usage();
  }
  try {
    if (command == "check") return check(target, cli);
    if (command == "export" && !cases.empty()) return export_cases(target, cases);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft-reference: conv: %s\n", e.what());
    return 1;
  }
  usage();
}
