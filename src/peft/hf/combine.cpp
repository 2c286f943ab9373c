// `d9d-peft combine`: LoRA adapter directories combined into a new one, with
// the arithmetic of add_weighted_adapter and PEFT's rules for the new config.
#include <d9d/model_state/io/atomic_file.h>
#include <d9d/model_state/io/safetensors.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/combine.h>
#include <d9d/peft/hf/config.h>
#include <d9d/peft/hf/files.h>
#include <d9d/peft/hf/lora_merge.h>

#include <ATen/ATen.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

namespace d9d::peft::hf {

namespace fs = std::filesystem;
namespace ms = d9d::model_state;

namespace {

struct Input {
  AdapterFiles files;
  LoraConfig config;
};

/// The tensor under `path + suffix` (with or without PEFT's prefix), or undefined.
at::Tensor find(const AdapterTensors& tensors, const std::string& path, const std::string& suffix) {
  for (const std::string& key : {kPeftKeyPrefix + path + suffix, path + suffix}) {
    auto it = tensors.find(key);
    if (it != tensors.end()) return it->second;
  }
  return {};
}

std::string regex_escape(const std::string& s) {
  static const std::string specials = R"(\^$.|?*+()[]{})";
  std::string out;
  for (char c : s) {
    if (specials.find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

/// PEFT's new `target_modules`: the lists' union, or the regexes joined.
nlohmann::json combined_targets(const std::vector<Input>& inputs) {
  const bool regex = inputs[0].config.target_modules.regex.has_value();
  std::set<std::string> names;
  std::vector<std::string> regexes;
  for (const auto& in : inputs) {
    const auto& t = in.config.target_modules;
    if (t.regex.has_value() != regex) {
      throw PeftError(fmt::format("{}: target_modules is {} here but {} in {}; PEFT cannot combine adapters whose "
                                  "target_modules mix lists and regexes",
                                  in.files.config_path, t.describe(), inputs[0].config.target_modules.describe(),
                                  inputs[0].files.config_path));
    }
    if (t.regex) regexes.push_back("(" + *t.regex + ")");
    names.insert(t.names.begin(), t.names.end());
  }
  if (regex) return fmt::format("{}", fmt::join(regexes, "|"));
  return nlohmann::json(std::vector<std::string>(names.begin(), names.end()));
}

}  // namespace

CombineResult combine_adapter_dirs(const std::vector<std::string>& dirs, const std::vector<double>& weights,
                                   const std::string& out_dir, const WeightedAdapterOptions& options) {
  const std::string what = "combine";
  if (dirs.empty()) throw PeftError(what + ": no adapters to combine; give at least one adapter directory");
  if (weights.size() != dirs.size()) {
    throw PeftError(fmt::format("{}: {} weights for {} adapters ({}); give one weight per adapter", what,
                                weights.size(), dirs.size(), fmt::join(dirs, ", ")));
  }
  for (size_t i = 0; i < weights.size(); ++i) {
    if (!std::isfinite(weights[i])) {
      throw PeftError(fmt::format("{}: the weight of {} is {}; weights must be finite", what, dirs[i], weights[i]));
    }
  }
  options.validate(dirs.size());
  std::error_code ec;
  for (const auto& dir : dirs) {
    if (fs::exists(out_dir, ec) && fs::equivalent(dir, out_dir, ec)) {
      throw PeftError(fmt::format("{}: the output directory '{}' is the input adapter '{}'; write to a new directory",
                                  what, out_dir, dir));
    }
  }

  std::vector<Input> inputs;
  std::vector<int64_t> ranks;
  std::set<std::string> paths;
  for (const auto& dir : dirs) {
    Input in{read_adapter_files(dir), {}};
    if (in.files.peft_type != "LORA") {
      throw PeftError(fmt::format("{}: {} holds a {} adapter; only LoRA adapters combine", what, dir,
                                  in.files.peft_type));
    }
    in.config = parse_lora_config(in.files.config, in.files.config_path);
    if (!in.config.target_parameters.empty()) {
      throw PeftError(fmt::format("{}: {} sets target_parameters (LoRA on 3-D expert parameters); combining such "
                                  "adapters is not supported, nothing was written",
                                  what, in.files.config_path));
    }
    if (in.config.use_dora) {
      throw PeftError(fmt::format("{}: {} sets use_dora; a weighted combination keeps only B @ A and would drop the "
                                  "magnitudes, so combine plain LoRA adapters",
                                  what, in.files.config_path));
    }
    int64_t r = in.config.r;  // PEFT: max(r, *rank_pattern.values())
    for (const auto& p : in.config.rank_pattern) r = std::max(r, p.second);
    ranks.push_back(r);
    for (const auto& p : adapted_module_paths(in.files.tensors, in.files.weights_path)) paths.insert(p);
    inputs.push_back(std::move(in));
  }
  const lora::WeightedPlan plan = lora::plan_weighted(dirs, ranks, options, what);
  nlohmann::json config = inputs[0].files.config;
  config["r"] = plan.rank;
  config["lora_alpha"] = plan.rank;
  config["target_modules"] = combined_targets(inputs);
  config["rank_pattern"] = nlohmann::json::object();
  config["alpha_pattern"] = nlohmann::json::object();

  ms::StateDict out;
  for (const auto& path : paths) {
    std::vector<lora::WeightedInput> layer;
    std::string kind;  // "" / "linear" / "embedding", and which input set it
    size_t kind_from = 0;
    for (size_t i = 0; i < inputs.size(); ++i) {
      const auto& t = inputs[i].files.tensors;
      const std::string source = inputs[i].files.weights_path;
      at::Tensor a = find(t, path, ".lora_A.weight"), b = find(t, path, ".lora_B.weight");
      std::string k = "linear", a_key = ".lora_A.weight", b_key = ".lora_B.weight";
      if (!a.defined() && !b.defined()) {
        a = find(t, path, ".lora_embedding_A");
        b = find(t, path, ".lora_embedding_B");
        k = "embedding", a_key = ".lora_embedding_A", b_key = ".lora_embedding_B";
      }
      if (!a.defined() && !b.defined()) continue;
      if (!a.defined() || !b.defined()) {
        throw PeftError(fmt::format("{}: '{}' has only one of '{}{}' and '{}{}' (an incomplete adapter file)", what,
                                    source, path, a_key, path, b_key));
      }
      if (!kind.empty() && kind != k) {
        throw PeftError(fmt::format("{}: '{}' is a {} layer in {} but a {} layer in {}; adapters of different base "
                                    "models?",
                                    what, path, kind, dirs[kind_from], k, dirs[i]));
      }
      if (kind.empty()) kind = k, kind_from = i;
      const auto params = inputs[i].config.select(path);
      if (!params) {
        throw PeftError(fmt::format("{}: {} holds '{}' but its adapter_config.json does not target '{}'", what,
                                    source, path + a_key, path));
      }
      if (a.dim() != 2 || b.dim() != 2 || !at::isFloatingType(a.scalar_type()) || a.size(0) != params->r() ||
          b.size(1) != a.size(0)) {
        throw PeftError(fmt::format("{}: {}: '{}{}' {} and '{}{}' {} are not LoRA factors of rank {} (r / "
                                    "rank_pattern of its adapter_config.json)",
                                    what, source, path, a_key, fmt::join(a.sizes(), "x"), path, b_key,
                                    fmt::join(b.sizes(), "x"), params->r()));
      }
      if (!layer.empty() && (a.size(1) != layer[0].a.size(1) || b.size(0) != layer[0].b.size(0))) {
        throw PeftError(fmt::format("{}: '{}' is {}x{} in {} but {}x{} in {}; adapters of different base models?",
                                    what, path, b.size(0), a.size(1), dirs[i], layer[0].b.size(0),
                                    layer[0].a.size(1), dirs[kind_from]));
      }
      for (const auto& [key, tensor] : {std::make_pair(a_key, a), std::make_pair(b_key, b)}) {
        if (!at::isfinite(tensor).all().item<bool>()) {
          throw PeftError(fmt::format("{}: {}: '{}{}' holds NaN or Inf; fix or retrain that adapter", what, source,
                                      path, key));
        }
      }
      layer.push_back({a, b, params->scale(), weights[i]});
    }
    if (layer.empty()) continue;
    auto ab = lora::combine_weighted(layer, plan, options, fmt::format("{}: '{}'", what, path),
                                     kind == "embedding" ? lora::LayerKind::Embedding : lora::LayerKind::Linear);
    const int64_t r = ab.first.size(0);
    if (r != plan.rank) {
      config["rank_pattern"][regex_escape(path)] = r;
      config["alpha_pattern"][regex_escape(path)] = r;
    }
    const bool embedding = kind == "embedding";
    out.emplace(kPeftKeyPrefix + path + (embedding ? ".lora_embedding_A" : ".lora_A.weight"), ab.first.contiguous());
    out.emplace(kPeftKeyPrefix + path + (embedding ? ".lora_embedding_B" : ".lora_B.weight"), ab.second.contiguous());
  }

  const bool created = !fs::exists(out_dir, ec);
  fs::create_directories(out_dir, ec);
  if (ec) throw ms::CheckpointError(fmt::format("{}: cannot create the output directory: {}", out_dir, ec.message()));
  ms::PendingFiles pending(out_dir, created);
  ms::save_safetensors(pending.add("adapter_model.safetensors"), out, {{"format", "pt"}});
  ms::write_file_atomically(pending.add("adapter_config.json"), config.dump(2));
  pending.commit();
  return {plan.combination_type, plan.rank, out.size() / 2};
}

}  // namespace d9d::peft::hf
