// The C++ half of the checks against real Hugging Face PEFT (tests/peft_reference/).
//
//   peft_reference_tool check CASES --cli D9D_PEFT
//       PEFT -> d9d-peft: every case written by generate_cases.py is loaded
//       here (tests/toy_model.h), and its logits with the adapter, its merged
//       weights and merged logits, and the weights `d9d-peft merge` writes must
//       all match what PEFT computed, to 1e-5.
//   peft_reference_tool export OUT --fixtures DIR --trainer-run RUN [--trainer-run RUN ...] --cli D9D_PEFT
//       d9d-peft -> PEFT: writes what this library produces (adapters re-saved
//       from the fixtures, several named adapters saved one by one, one trained
//       here, the one each d9d-peft-train run wrote (one run per method kind,
//       sharing a base); a sharded checkpoint; `d9d-peft merge` output) with the logits this library computes, and beside each
//       safetensors file a `.reference.pt` (LibTorch's own `torch::pickle_save`)
//       of the tensors as they were in memory, for check_exports.py.
//
//   peft_reference_tool moe-check CASES
//       PEFT -> d9d-peft for LoRA on 3-D expert parameters (target_parameters):
//       every case generate_moe.py wrote is loaded into the C++ MoE twin
//       (moe_twin.h, grouped experts): logits with the adapter, merged expert
//       weights mapped back to the Python layout, untouched weights bit-equal,
//       merged logits, to 1e-5.
//   peft_reference_tool moe-export OUT --cases CASES
//       d9d-peft -> PEFT: random adapters made here on the twin (both layouts,
//       rsLoRA, rank/alpha patterns, grouped and plain layers in one file),
//       saved with hf::save_adapter beside the logits computed here, for
//       check_moe_exports.py.
//
// Exit status 0 when everything matched; every failure names its case.
#include "../toy_model.h"
#include "gpt.h"
#include "moe_twin.h"

#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/io/stream.h>
#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>
#include <d9d/peft.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/nn/functional/loss.h>
#include <torch/optim/sgd.h>
#include <torch/serialize.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using nlohmann::json;

namespace {

/// Agreement required, relative to the reference's magnitude: fp32 rounding
/// grows with it (and LibTorch's BLAS need not be PEFT's), so the bound is
/// 1e-5 · max(1, max |reference|): 1e-5 absolute for values up to 1.
constexpr double kTolerance = 1e-5;

json read_json(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  return json::parse(in);
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return std::numeric_limits<double>::infinity();
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

/// max |ours - reference| in units of max(1, max |reference|).
double relative_diff(const at::Tensor& ours, const at::Tensor& reference) {
  return max_diff(ours, reference) / std::max(1.0, reference.abs().max().item<double>());
}

ms::LoadOptions quiet() {
  ms::LoadOptions o;
  o.progress = nullptr;
  return o;
}

int run(const std::string& command) {
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

std::string quote(const fs::path& p) { return "'" + p.string() + "'"; }

// ------------------------------------------------------------------ check

/// One PEFT case; returns the failures (empty when it matched).
std::vector<std::string> check_case(const fs::path& dir, const std::string& cli, const fs::path& scratch) {
  std::vector<std::string> failures;
  const json info = read_json(dir / "config.json");
  const json& s = info.at("sizes");
  toy::Toy model(toy::ToyConfig{s.at("vocab").get<int64_t>(), s.at("d").get<int64_t>(), s.at("f").get<int64_t>(),
                                s.at("n_layers").get<int64_t>()});
  const std::string base = (dir / "model.safetensors").string();
  ms::load_model_state(base, *ms::identity_mapper_from_module(*model), *model, quiet());
  model->eval();
  const auto ids = ms::SafetensorsFile::open((dir / "inputs.safetensors").string())->get("input_ids");
  const auto expected = ms::SafetensorsFile::open((dir / "expected.safetensors").string());
  torch::NoGradGuard no_grad;

  auto adapter = peft::hf::load_adapter(*model, (dir / "adapter").string());
  // `slack`: how far PEFT's own two computations of the same numbers lie apart
  // (relative, as `relative_diff`); a check is never asked to be tighter than that.
  auto expect = [&](const std::string& what, const at::Tensor& ours, const at::Tensor& peft, double slack = 0.0) {
    const double diff = relative_diff(ours, peft);
    if (!(diff <= std::max(kTolerance, slack))) {
      failures.push_back(fmt::format("{}: max |d9d - peft| = {:.3g} with max |peft| = {:.3g} (PEFT's own merged vs "
                                     "unmerged: {:.3g})",
                                     what, max_diff(ours, peft), peft.abs().max().item<double>(), slack));
    }
  };
  expect("logits with the adapter", model->forward(ids), expected->get("logits"));

  peft::merge_peft(*adapter, model);
  const auto state = ms::module_state_dict(*model);
  size_t merged_keys = 0;
  for (const auto& key : expected->keys()) {
    if (key.rfind("merged.", 0) != 0) continue;
    ++merged_keys;
    const std::string name = key.substr(7);
    if (!state.count(name)) {
      failures.push_back("merged model has no '" + name + "'");
      continue;
    }
    expect("merged weight " + name, state.at(name), expected->get(key));
  }
  if (merged_keys != state.size()) {
    failures.push_back("merged model has " + std::to_string(state.size()) + " tensors, PEFT's " +
                       std::to_string(merged_keys));
  }
  // Merging is exact arithmetic, rounded differently: where PEFT's merged logits
  // move from its unmerged ones by more than the tolerance (a model that
  // amplifies rounding), ours may differ from PEFT's by as much, and no more
  // than twice that.
  const double peft_rounding = relative_diff(expected->get("merged_logits"), expected->get("logits"));
  expect("logits after merging", model->forward(ids), expected->get("merged_logits"), 2.0 * peft_rounding);

  // The offline merge, without model code, must give PEFT's merged weights too.
  const fs::path out = scratch / dir.filename();
  fs::remove_all(out);
  const std::string cmd = quote(cli) + " merge --base " + quote(base) + " --adapter " +
                          quote(dir / "adapter") + " --out " + quote(out) + " > " + quote(scratch / "cli.log") +
                          " 2>&1";
  if (run(cmd) != 0) {
    std::ifstream log(scratch / "cli.log");
    std::stringstream text;
    text << log.rdbuf();
    failures.push_back("d9d-peft merge failed: " + text.str());
  } else {
    const auto written = ms::SafetensorsFile::open((out / "model.safetensors").string());
    for (const auto& key : expected->keys()) {
      if (key.rfind("merged.", 0) != 0) continue;
      const std::string name = key.substr(7);
      if (!written->keys().count(name)) {
        failures.push_back("d9d-peft merge output has no '" + name + "'");
        continue;
      }
      expect("d9d-peft merge: " + name, written->get(name), expected->get(key));
    }
    if (written->keys().size() != merged_keys) failures.push_back("d9d-peft merge output has a different key set");
  }
  fs::remove_all(out);
  return failures;
}

int check(const fs::path& cases, const std::string& cli) {
  std::vector<fs::path> dirs;
  for (const auto& e : fs::directory_iterator(cases)) {
    if (e.is_directory() && e.path().filename().string().rfind("case_", 0) == 0) dirs.push_back(e.path());
  }
  std::sort(dirs.begin(), dirs.end());
  if (dirs.empty()) {
    std::fprintf(stderr, "peft-reference: no case_* directories under %s (run generate_cases.py first)\n",
                 cases.string().c_str());
    return 1;
  }
  const fs::path scratch = cases / "cli_scratch";
  fs::create_directories(scratch);
  int failed = 0;
  for (const auto& dir : dirs) {
    const std::string seed = dir.filename().string().substr(5);
    std::vector<std::string> failures;
    try {
      failures = check_case(dir, cli, scratch);
    } catch (const std::exception& e) {
      failures.push_back(std::string("error: ") + e.what());
    }
    if (failures.empty()) continue;
    ++failed;
    const json info = read_json(dir / "config.json");
    std::printf("FAIL %s\n  PEFT config: %s\n  adapted: %s\n", dir.filename().string().c_str(),
                info.at("peft_config").dump().c_str(), info.at("adapted_modules").dump().c_str());
    for (const auto& f : failures) std::printf("  %s\n", f.c_str());
    std::printf("  reproduce: bash scripts/peft-reference.sh --seed %s --count 1\n", seed.c_str());
  }
  fs::remove_all(scratch);
  std::printf("peft-reference: %zu PEFT cases checked (logits, merged weights, merged logits, d9d-peft merge): "
              "%zu matched to %g relative to max(1, max |peft|), %d failed\n",
              dirs.size(), dirs.size() - failed, kTolerance, failed);
  return failed ? 1 : 0;
}

// ----------------------------------------------------------------- export

void save_reference(const ms::StateDict& state, const fs::path& path) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& [k, v] : state) dict.insert(k, v.detach().contiguous());
  const std::vector<char> bytes = torch::pickle_save(c10::IValue(dict));
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

/// Saves adapter `name` (empty: the only one) of `model` and the logits it gives
/// on `ids` with that adapter alone active.
template <typename Model>
void export_adapter(Model& model, const fs::path& dir, const at::Tensor& ids, const std::string& name = {}) {
  peft::hf::SaveAdapterOptions options;
  options.adapter_name = name;
  peft::hf::save_adapter(*model, dir.string(), options);
  save_reference(peft::hf::get_peft_model_state_dict(*model, name), dir / "adapter_model.reference.pt");
  torch::NoGradGuard no_grad;
  model->eval();
  ms::save_safetensors((dir / "cpp_logits.safetensors").string(), {{"logits", model->forward(ids)}, {"input_ids", ids}});
}

int export_all(const fs::path& out, const fs::path& fixtures, const std::vector<fs::path>& trainer_runs,
               const std::string& cli) {
  const fs::path toy_dir = fixtures / "hf_peft" / "toy";
  fs::remove_all(out);
  fs::create_directories(out / "adapters");
  const auto ids = ms::SafetensorsFile::open((toy_dir / "inputs.safetensors").string())->get("input_ids");
  auto toy_base = [&] {
    toy::Toy model;
    ms::load_model_state((toy_dir / "model.safetensors").string(), *ms::identity_mapper_from_module(*model), *model,
                         quiet());
    model->eval();
    return model;
  };
  int count = 0;

  // 1. Every fixture adapter, loaded and saved again.
  for (const char* name : {"lora_attn_r4", "lora_all_linear_r8", "lora_rslora", "lora_embed_head", "dora_mlp"}) {
    toy::Toy model = toy_base();
    peft::hf::load_adapter(*model, (toy_dir / "adapters" / name).string());
    export_adapter(model, out / "adapters" / (std::string("resaved_") + name), ids);
    ++count;
  }

  // 2. Several named adapters in one model, saved one by one.
  {
    toy::Toy model = toy_base();
    const std::vector<std::pair<std::string, std::string>> named = {
        {"attn", "lora_attn_r4"}, {"rs", "lora_rslora"}, {"embed", "lora_embed_head"}};
    for (const auto& [name, fixture] : named) peft::hf::load_adapter(*model, (toy_dir / "adapters" / fixture).string(), name);
    for (const auto& [name, fixture] : named) {
      peft::set_adapter(*model, name);
      export_adapter(model, out / "adapters" / ("named_" + name), ids, name);
      ++count;
    }
  }

  // 3. IA3 made here (random vectors, feed-forward and output scaling), which
  //    PEFT must read as an IA3 adapter with the same numbers.
  {
    toy::Toy model = toy_base();
    torch::manual_seed(1);
    peft::hf::IA3Config config;
    config.target_modules.names = {"q_proj", "v_proj", "up_proj", "down_proj", "lm_head"};
    config.feedforward_modules.names = {"down_proj"};
    config.init_ia3_weights = false;
    peft::IA3 ia3(config);
    peft::inject_peft_and_freeze(ia3, model);
    export_adapter(model, out / "adapters" / "ia3_made_here", ids);
    ++count;
  }

  // 4. LoHa made here: kLohaExports random configs (r, alpha, targets as names
  //    or a regex, rank_pattern / alpha_pattern, random factors), from a seed
  //    ($D9D_PEFT_SEED, else drawn and printed), and one trained here with
  //    rank and module dropout. PEFT must read each as a LoHa adapter with the
  //    same numbers.
  {
    const char* env = std::getenv("D9D_PEFT_SEED");
    const unsigned seed = env && *env ? static_cast<unsigned>(std::stoul(env)) : std::random_device{}();
    std::printf("peft-reference: LoHa exports from seed %u\n", seed);
    std::mt19937 rng(seed);
    auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    const std::vector<std::string> linear = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"};
    constexpr int kLohaExports = 10;
    for (int i = 0; i < kLohaExports; ++i) {
      peft::hf::LoHaConfig config;
      config.r = uniform(1, 8);
      config.alpha = uniform(0, 1) ? static_cast<double>(uniform(1, 32)) : uniform(50, 2000) / 100.0;
      if (uniform(0, 3) == 0) {
        config.target_modules.regex = uniform(0, 1) ? R"(layers\.\d+\.(attention|mlp)\.\w+_proj)" : R"(.*\.(q|v)_proj|lm_head)";
      } else {
        for (const auto& name : linear) {
          if (uniform(0, 1)) config.target_modules.names.push_back(name);
        }
        if (config.target_modules.names.empty()) config.target_modules.names.push_back(linear[uniform(0, 6)]);
      }
      if (uniform(0, 2) == 0) config.rank_pattern.emplace_back(linear[uniform(0, 5)], uniform(1, 8));
      if (uniform(0, 2) == 0) config.alpha_pattern.emplace_back(linear[uniform(0, 5)], uniform(1, 16));
      config.init_weights = false;
      toy::Toy model = toy_base();
      torch::manual_seed(seed + i);
      peft::LoHa loha(config);
      try {
        peft::inject_peft_and_freeze(loha, model);
      } catch (const peft::PeftError&) {
        --i;  // a draw that matches nothing on the toy: draw again
        continue;
      }
      export_adapter(model, out / "adapters" / fmt::format("loha_random_{}", i), ids);
      ++count;
    }
    toy::Toy model = toy_base();
    torch::manual_seed(seed);
    peft::LoHa loha(peft::LoHa::from_config(
        {".*(q|v|up|down)_proj", peft::LoHaParameters().r(4).alpha(8).rank_dropout(0.2).module_dropout(0.1)}));
    peft::inject_peft_and_freeze(loha, model);
    model->train();
    torch::optim::SGD opt(peft::trainable_parameters(*model), torch::optim::SGDOptions(0.5));
    for (int step = 0; step < 20; ++step) {
      opt.zero_grad();
      auto logits = model->forward(ids.slice(1, 0, -1));
      torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), ids.slice(1, 1).reshape({-1}))
          .backward();
      opt.step();
    }
    export_adapter(model, out / "adapters" / "loha_trained_by_cpp", ids);
    ++count;
  }

  // 4b. OFT made here: kOftExports random configs (r or oft_block_size, sizes
  //     PEFT adjusts included, coft, block_share, Cayley-Neumann or exact,
  //     targets as names or a regex, random rotations), from the same seed,
  //     and one trained here with coft. PEFT must read each as an OFT adapter
  //     with the same numbers.
  {
    const char* env = std::getenv("D9D_PEFT_SEED");
    const unsigned seed = env && *env ? static_cast<unsigned>(std::stoul(env)) : std::random_device{}();
    std::printf("peft-reference: OFT exports from seed %u\n", seed);
    std::mt19937 rng(seed + 1);
    auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    const std::vector<std::string> linear = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"};
    constexpr int kOftExports = 10;
    for (int i = 0; i < kOftExports; ++i) {
      peft::hf::OFTConfig config;
      if (uniform(0, 2) == 0) {
        config.r = uniform(2, 8);
        config.oft_block_size = 0;
      } else {
        config.oft_block_size = std::vector<int>{2, 3, 4, 5, 8}[uniform(0, 4)];
      }
      config.coft = uniform(0, 2) == 0;
      config.eps = std::vector<double>{6e-5, 1e-2, 0.1}[uniform(0, 2)];
      config.block_share = uniform(0, 2) == 0;
      config.use_cayley_neumann = uniform(0, 2) != 0;
      config.num_cayley_neumann_terms = uniform(1, 8);
      if (uniform(0, 3) == 0) {
        config.target_modules.regex = uniform(0, 1) ? R"(layers\.\d+\.(attention|mlp)\.\w+_proj)" : R"(.*\.(q|v)_proj|lm_head)";
      } else {
        for (const auto& name : linear) {
          if (uniform(0, 1)) config.target_modules.names.push_back(name);
        }
        if (config.target_modules.names.empty()) config.target_modules.names.push_back(linear[uniform(0, 6)]);
      }
      config.init_weights = false;
      toy::Toy model = toy_base();
      torch::manual_seed(seed + 100 + i);
      peft::OFT oft(config);
      peft::inject_peft_and_freeze(oft, model);
      export_adapter(model, out / "adapters" / fmt::format("oft_random_{}", i), ids);
      ++count;
    }
    toy::Toy model = toy_base();
    torch::manual_seed(seed);
    peft::OFT oft(peft::OFT::from_config({".*(q|v|up|down)_proj", peft::OFTParameters().oft_block_size(4).coft(true).eps(0.05)}));
    peft::inject_peft_and_freeze(oft, model);
    model->train();
    torch::optim::SGD opt(peft::trainable_parameters(*model), torch::optim::SGDOptions(0.5));
    for (int step = 0; step < 20; ++step) {
      opt.zero_grad();
      auto logits = model->forward(ids.slice(1, 0, -1));
      torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), ids.slice(1, 1).reshape({-1}))
          .backward();
      opt.step();
    }
    export_adapter(model, out / "adapters" / "oft_trained_by_cpp", ids);
    ++count;
  }

  // 4c. LoKr made here, as LoHa above: kLokrExports random configs (r from 1
  //     to 8, often 1, so that w1 and w2 come whole or factored, decompose_both,
  //     decompose_factor, targets, rank/alpha patterns, random factors), and
  //     one trained here with rank dropout (scaled) and module dropout.
  {
    const char* env = std::getenv("D9D_PEFT_SEED");
    const unsigned seed = env && *env ? static_cast<unsigned>(std::stoul(env)) : std::random_device{}();
    std::printf("peft-reference: LoKr exports from seed %u\n", seed);
    std::mt19937 rng(seed ^ 0x10c7u);
    auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    const std::vector<std::string> linear = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"};
    const std::vector<int64_t> factors = {-1, -1, -1, 2, 4, 8};
    constexpr int kLokrExports = 10;
    for (int i = 0; i < kLokrExports; ++i) {
      peft::hf::LoKrConfig config;
      // r 1 often: on the toy's 16 = 4·4 only r < 2 factors w1 (with decompose_both).
      config.r = uniform(0, 2) == 0 ? 1 : uniform(1, 8);
      config.alpha = uniform(0, 1) ? static_cast<double>(uniform(1, 32)) : uniform(50, 2000) / 100.0;
      config.decompose_both = uniform(0, 1);
      config.decompose_factor = factors[uniform(0, 5)];
      if (uniform(0, 3) == 0) {
        config.target_modules.regex = uniform(0, 1) ? R"(layers\.\d+\.(attention|mlp)\.\w+_proj)" : R"(.*\.(q|v)_proj|lm_head)";
      } else {
        for (const auto& name : linear) {
          if (uniform(0, 1)) config.target_modules.names.push_back(name);
        }
        if (config.target_modules.names.empty()) config.target_modules.names.push_back(linear[uniform(0, 6)]);
      }
      if (uniform(0, 2) == 0) config.rank_pattern.emplace_back(linear[uniform(0, 5)], uniform(1, 8));
      if (uniform(0, 2) == 0) config.alpha_pattern.emplace_back(linear[uniform(0, 5)], uniform(1, 16));
      config.init_weights = peft::LoKrInit::kRandom;
      toy::Toy model = toy_base();
      torch::manual_seed(seed + i);
      peft::LoKr lokr(config);
      try {
        peft::inject_peft_and_freeze(lokr, model);
      } catch (const peft::PeftError&) {
        --i;  // a draw that matches nothing on the toy: draw again
        continue;
      }
      export_adapter(model, out / "adapters" / fmt::format("lokr_random_{}", i), ids);
      ++count;
    }
    toy::Toy model = toy_base();
    torch::manual_seed(seed);
    peft::LoKr lokr(peft::LoKr::from_config({".*(q|v|up|down)_proj", peft::LoKrParameters().r(2).alpha(4).decompose_both(true)
                                                                      .rank_dropout(0.2).rank_dropout_scale(true)
                                                                      .module_dropout(0.1)}));
    peft::inject_peft_and_freeze(lokr, model);
    model->train();
    torch::optim::SGD opt(peft::trainable_parameters(*model), torch::optim::SGDOptions(0.5));
    for (int step = 0; step < 20; ++step) {
      opt.zero_grad();
      auto logits = model->forward(ids.slice(1, 0, -1));
      torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), ids.slice(1, 1).reshape({-1}))
          .backward();
      opt.step();
    }
    export_adapter(model, out / "adapters" / "lokr_trained_by_cpp", ids);
    ++count;
  }

  // 4d. VeRA: PEFT's fixture re-saved, and kVeraExports random configs made
  //     here (r, projection_prng_key, save_projection either way, d_initial,
  //     targets as names or a regex over layers of different sizes, random
  //     λ vectors), from the same seed. PEFT must read each as a VeRA adapter
  //     (drawing the projections itself where the file has none) with the
  //     same numbers.
  {
    toy::Toy fixture_model = toy_base();
    peft::hf::load_adapter(*fixture_model, (toy_dir / "tuners" / "vera").string());
    export_adapter(fixture_model, out / "adapters" / "resaved_vera", ids);
    ++count;
    const char* env = std::getenv("D9D_PEFT_SEED");
    const unsigned seed = env && *env ? static_cast<unsigned>(std::stoul(env)) : std::random_device{}();
    std::printf("peft-reference: VeRA exports from seed %u\n", seed);
    std::mt19937 rng(seed ^ 0x5eedu);
    auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    const std::vector<std::string> linear = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"};
    constexpr int kVeraExports = 10;
    for (int i = 0; i < kVeraExports; ++i) {
      peft::hf::VeraConfig config;
      config.r = uniform(1, 16);
      config.projection_prng_key = uniform(0, 1) ? 0 : uniform(1, 1 << 30);
      config.save_projection = i % 2 == 0;
      config.d_initial = uniform(-100, 100) / 100.0;
      config.init_weights = uniform(0, 1) == 0;
      if (uniform(0, 3) == 0) {
        config.target_modules.regex = uniform(0, 1) ? R"(layers\.\d+\.(attention|mlp)\.\w+_proj)" : R"(.*\.(k|up)_proj|lm_head)";
      } else {
        for (const auto& name : linear) {
          if (uniform(0, 1)) config.target_modules.names.push_back(name);
        }
        if (config.target_modules.names.empty()) config.target_modules.names.push_back(linear[uniform(0, 6)]);
      }
      toy::Toy model = toy_base();
      torch::manual_seed(seed + i);
      peft::Vera vera(config);
      peft::inject_peft_and_freeze(vera, model);
      {
        torch::NoGradGuard no_grad;
        for (auto& p : peft::trainable_parameters(*model)) p.copy_(torch::randn_like(p));  // every λ away from its init
      }
      export_adapter(model, out / "adapters" / fmt::format("vera_random_{}", i), ids);
      ++count;
    }
  }

  // 5. One trained here: LoRA with dropout on every projection, a few SGD steps.
  {
    toy::Toy model = toy_base();
    torch::manual_seed(0);
    peft::LoRA lora({R"(.*_proj|lm_head)", peft::LoRAParameters().r(4).alpha(8).dropout(0.1)});
    peft::inject_peft_and_freeze(lora, model);
    model->train();
    torch::optim::SGD opt(peft::trainable_parameters(*model), torch::optim::SGDOptions(0.5));
    for (int step = 0; step < 20; ++step) {
      opt.zero_grad();
      auto logits = model->forward(ids.slice(1, 0, -1));
      torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), ids.slice(1, 1).reshape({-1}))
          .backward();
      opt.step();
    }
    export_adapter(model, out / "adapters" / "trained_by_cpp", ids);
    ++count;
  }

  // 6. The adapters d9d-peft-train wrote (one run per method kind), each on the
  // trainer's GPT: the first run's base saved again as a sharded checkpoint, and
  // each run's adapter merged offline into it. Runs that reused a base
  // (run_config.json's base_checkpoint) must share the first run's.
  fs::path first_base;
  for (const fs::path& trainer_run : trainer_runs) {
    const json run_config = read_json(trainer_run / "run_config.json");
    const fs::path base_dir = run_config.contains("base_checkpoint") && run_config["base_checkpoint"].is_string()
                                  ? fs::path(run_config["base_checkpoint"].get<std::string>())
                                  : trainer_run / "base";
    if (first_base.empty()) first_base = base_dir;
    if (fs::weakly_canonical(base_dir) != fs::weakly_canonical(first_base)) {
      throw std::runtime_error(trainer_run.string() + ": its base " + base_dir.string() + " is not the first run's (" +
                               first_base.string() + "); every --trainer-run must share one base");
    }
    const auto base_file = ms::SafetensorsFile::open((base_dir / "model.safetensors").string());
    const json& m = run_config.at("model");
    trainer::GptConfig config;
    config.vocab = base_file->get("embed_tokens.weight").size(0);
    config.context = base_file->get("embed_positions.weight").size(0);
    config.d_model = m.at("d_model").get<int64_t>();
    config.n_layers = m.at("n_layers").get<int64_t>();
    config.n_heads = m.at("n_heads").get<int64_t>();
    config.d_ff = m.at("d_ff").get<int64_t>();
    trainer::Gpt gpt(config);
    ms::load_model_state(base_dir.string(), *ms::identity_mapper_from_module(*gpt), *gpt, quiet());

    const fs::path sharded = out / "checkpoint_sharded";
    if (!fs::exists(sharded)) {
      ms::SaveOptions save;
      save.progress = nullptr;
      save.shard_size = 64 * 1024;  // several shards and an index
      ms::save_model_state(sharded.string(), *ms::identity_mapper_from_module(*gpt), *gpt, save);
      save_reference(ms::module_state_dict(*gpt), sharded / "model.reference.pt");
    }

    peft::hf::load_adapter(*gpt, (trainer_run / "adapter").string());
    torch::manual_seed(1);
    const auto gpt_ids = torch::randint(0, config.vocab, {4, config.context}, at::kLong);
    const fs::path run_out = out / "trainer" / trainer_run.filename();
    const fs::path dir = run_out / "adapter";
    fs::create_directories(run_out);
    fs::copy(trainer_run / "adapter", dir, fs::copy_options::recursive);
    {
      torch::NoGradGuard no_grad;
      gpt->eval();
      ms::save_safetensors((dir / "cpp_logits.safetensors").string(),
                           {{"logits", gpt->forward(gpt_ids)}, {"input_ids", gpt_ids}});
    }
    std::ofstream(run_out / "gpt.json")
        << json{{"vocab", config.vocab}, {"context", config.context}, {"d_model", config.d_model},
                {"n_layers", config.n_layers}, {"n_heads", config.n_heads}, {"d_ff", config.d_ff}}
               .dump();
    fs::copy(trainer_run / "merged", run_out / "trainer_merged", fs::copy_options::recursive);
    const std::string cmd = quote(cli) + " merge --base " + quote(sharded) + " --adapter " + quote(dir) +
                            " --out " + quote(run_out / "cli_merged");
    if (run(cmd) != 0) throw std::runtime_error("d9d-peft merge failed: " + cmd);
    count += 1;
  }
  std::printf("peft-reference: exported %d adapters (fixtures re-saved, named, IA3, LoHa, LoKr, OFT and VeRA made here, trained here, "
              "trained by d9d-peft-train, one per run), a sharded checkpoint and d9d-peft merge output to %s\n",
              count, out.string().c_str());
  return 0;
}

// -------------------------------------------------------------------- MoE

peft::hf::ExpertOptions expert_options(const moe_twin::Config& c) {
  // The Python twin's fused_in_out experts set is_transposed = True (as GPT-OSS).
  return peft::hf::ExpertOptions().storage(c.layout == "fused" ? peft::hf::ExpertStorage::out_in
                                                                : peft::hf::ExpertStorage::in_out);
}

moe_twin::Twin load_moe_twin(const fs::path& case_dir, moe_twin::Config* config_out = nullptr) {
  const auto c = moe_twin::Config::from_json(read_json(case_dir / "config.json").at("twin"));
  moe_twin::Twin twin(c);
  ms::load_model_state((case_dir / "model.safetensors").string(), *moe_twin::load_mapper(*twin, c), *twin, quiet());
  twin->eval();
  if (config_out) *config_out = c;
  return twin;
}

std::vector<fs::path> moe_cases(const fs::path& cases) {
  std::vector<fs::path> dirs;
  for (const auto& e : fs::directory_iterator(cases)) {
    if (e.is_directory() && e.path().filename().string().rfind("moe_", 0) == 0) dirs.push_back(e.path());
  }
  std::sort(dirs.begin(), dirs.end());
  if (dirs.empty()) throw std::runtime_error("no moe_* cases under " + cases.string() + " (run generate_moe.py first)");
  return dirs;
}

std::vector<std::string> check_moe_case(const fs::path& dir) {
  std::vector<std::string> failures;
  moe_twin::Config c;
  moe_twin::Twin twin = load_moe_twin(dir, &c);
  const auto ids = ms::SafetensorsFile::open((dir / "inputs.safetensors").string())->get("input_ids");
  const auto expected = ms::SafetensorsFile::open((dir / "expected.safetensors").string());
  torch::NoGradGuard no_grad;
  auto expect = [&](const std::string& what, const at::Tensor& ours, const at::Tensor& peft, double slack = 0.0) {
    const double diff = relative_diff(ours, peft);
    if (!(diff <= std::max(kTolerance, slack))) {
      failures.push_back(fmt::format("{}: max |d9d - peft| = {:.3g} with max |peft| = {:.3g}", what,
                                     max_diff(ours, peft), peft.abs().max().item<double>()));
    }
  };
  auto adapter = peft::hf::load_adapter(*twin, (dir / "adapter").string(), peft::kDefaultAdapterName, expert_options(c));
  expect("logits with the adapter", twin->forward(ids), expected->get("logits"));

  peft::merge_peft(*adapter, twin);
  const auto state = ms::module_state_dict(*twin);
  const auto experts = moe_twin::expert_keys(c);
  size_t merged_keys = 0;
  for (const auto& key : expected->keys()) {
    if (key.rfind("merged.", 0) != 0) continue;
    ++merged_keys;
    const std::string name = key.substr(7);
    const bool expert = std::find(experts.begin(), experts.end(), name) != experts.end();
    const std::string ours = expert ? name + ".weight" : name;
    if (!state.count(ours)) {
      failures.push_back("merged model has no '" + ours + "'");
      continue;
    }
    if (expert) {
      expect("merged expert weight " + name, moe_twin::to_python_layout(state.at(ours), c), expected->get(key));
    } else if (!torch::equal(state.at(ours), expected->get(key))) {
      failures.push_back("untargeted weight " + name + " differs from PEFT's merged model");
    }
  }
  if (merged_keys != state.size()) {
    failures.push_back(fmt::format("merged model has {} tensors, PEFT's {}", state.size(), merged_keys));
  }
  const double peft_rounding = relative_diff(expected->get("merged_logits"), expected->get("logits"));
  expect("logits after merging", twin->forward(ids), expected->get("merged_logits"), 2.0 * peft_rounding);
  return failures;
}

int moe_check(const fs::path& cases) {
  const auto dirs = moe_cases(cases);
  int failed = 0;
  for (const auto& dir : dirs) {
    std::vector<std::string> failures;
    try {
      failures = check_moe_case(dir);
    } catch (const std::exception& e) {
      failures.push_back(std::string("error: ") + e.what());
    }
    if (failures.empty()) continue;
    ++failed;
    std::printf("FAIL %s\n  config: %s\n", dir.filename().string().c_str(),
                read_json(dir / "config.json").at("adapter_config").dump().c_str());
    for (const auto& f : failures) std::printf("  %s\n", f.c_str());
  }
  std::printf("peft-reference: moe: %zu PEFT target_parameters cases checked (logits, merged expert weights, "
              "untouched weights, merged logits): %zu matched to %g relative to max(1, max |peft|), %d failed\n",
              dirs.size(), dirs.size() - failed, kTolerance, failed);
  return failed ? 1 : 0;
}

/// One adapter made here on the twin of `case_dir`'s base model, saved to `out`
/// with the logits it gives.
void moe_export_one(const fs::path& case_dir, const fs::path& out, const peft::hf::LoraConfig& config, int seed) {
  moe_twin::Config c;
  moe_twin::Twin twin = load_moe_twin(case_dir, &c);
  peft::hf::add_adapter(*twin, peft::kDefaultAdapterName, config);
  {
    torch::NoGradGuard no_grad;
    torch::manual_seed(seed);
    for (auto& p : peft::trainable_parameters(*twin)) p.copy_(torch::randn(p.sizes()) * 0.3);
  }
  fs::create_directories(out);
  fs::copy_file(case_dir / "model.safetensors", out / "model.safetensors");
  peft::hf::SaveAdapterOptions options;
  options.experts = expert_options(c);
  peft::hf::save_adapter(*twin, (out / "adapter").string(), options);
  const auto ids = ms::SafetensorsFile::open((case_dir / "inputs.safetensors").string())->get("input_ids");
  torch::NoGradGuard no_grad;
  ms::save_safetensors((out / "cpp_logits.safetensors").string(), {{"logits", twin->forward(ids)}, {"input_ids", ids}});
  std::ofstream(out / "twin.json") << read_json(case_dir / "config.json").at("twin").dump(2);
}

int moe_export(const fs::path& out, const fs::path& cases) {
  fs::remove_all(out);
  const auto dirs = moe_cases(cases);
  auto first_of = [&](const std::string& layout) {
    for (const auto& d : dirs) {
      if (read_json(d / "config.json").at("twin").at("layout") == layout) return d;
    }
    throw std::runtime_error("no " + layout + " case under " + cases.string());
  };
  const std::vector<std::string> both = {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"};
  int count = 0;
  for (const std::string layout : {"fused", "fused_in_out"}) {
    const fs::path base = first_of(layout);
    peft::hf::LoraConfig plain;
    plain.target_parameters = both;
    plain.r = 2;
    plain.lora_alpha = 4;
    moe_export_one(base, out / (layout + "_plain"), plain, 1);

    peft::hf::LoraConfig rs = plain;
    rs.r = 4;
    rs.lora_alpha = 8;
    rs.use_rslora = true;
    moe_export_one(base, out / (layout + "_rslora"), rs, 2);

    // rank_pattern / alpha_pattern by the full parameter name.
    peft::hf::LoraConfig patterns = plain;
    patterns.rank_pattern = {{"model\\.layers\\.1\\.mlp\\.experts\\.down_proj", 4}};
    patterns.alpha_pattern = {{"model\\.layers\\.1\\.mlp\\.experts\\.down_proj", 7}};
    moe_export_one(base, out / (layout + "_patterns"), patterns, 3);

    // Only down_proj (no base_layer infix), with plain Linear layers in the same file.
    peft::hf::LoraConfig mixed = plain;
    mixed.target_parameters = {"mlp.experts.down_proj"};
    mixed.target_modules.names = {"mix", "lm_head"};
    moe_export_one(base, out / (layout + "_mixed"), mixed, 4);
    count += 4;
  }
  std::printf("peft-reference: moe: exported %d target_parameters adapters made here to %s\n", count,
              out.string().c_str());
  return 0;
}

[[noreturn]] void usage() {
  std::fprintf(stderr,
               "usage: peft_reference_tool check CASES --cli D9D_PEFT\n"
               "       peft_reference_tool export OUT --fixtures DIR --trainer-run RUN [--trainer-run RUN ...] --cli D9D_PEFT\n"
               "       peft_reference_tool moe-check CASES\n"
               "       peft_reference_tool moe-export OUT --cases CASES\n");
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) usage();
  const std::string command = argv[1];
  const fs::path target = argv[2];
  std::string cli, fixtures, cases;
  std::vector<fs::path> trainer_runs;
  for (int i = 3; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) usage();
    if (arg == "--cli") cli = argv[++i];
    else if (arg == "--fixtures") fixtures = argv[++i];
    else if (arg == "--trainer-run") trainer_runs.emplace_back(argv[++i]);
    else if (arg == "--cases") cases = argv[++i];
    else usage();
  }
  try {
    if (command == "moe-check") return moe_check(target);
    if (command == "moe-export" && !cases.empty()) return moe_export(target, cases);
    if (cli.empty()) usage();
    if (command == "check") return check(target, cli);
    if (command == "export" && !fixtures.empty() && !trainer_runs.empty()) {
      return export_all(target, fixtures, trainer_runs, cli);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft-reference: %s\n", e.what());
    return 1;
  }
  usage();
}
