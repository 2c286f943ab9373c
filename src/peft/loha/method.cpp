// The LoHa method: injection, merge, the offline merge and its registration
// under PEFT's peft_type "LOHA".
#include <d9d/peft/adapters.h>
#include <d9d/peft/delta_layer.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/merge.h>
#include <d9d/peft/inject.h>
#include <d9d/peft/linear_targeting.h>
#include <d9d/peft/loha/math.h>
#include <d9d/peft/loha/method.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../builtin_methods.h"
#include "../hf/config_rules.h"
#include "../non_finite.h"

#include <array>
#include <map>

namespace d9d::peft {

LoHa::LoHa(hf::LoHaConfig config, std::string adapter_name)
    : PeftMethod(std::move(config)), adapter_name_(std::move(adapter_name)) {
  validate(config_);
  validate_adapter_name(adapter_name_);
}

LoHa LoHa::from_config(const LoHaConfig& config) {
  validate(config);
  return LoHa(to_peft_config(config));
}

PeftInjectionResult LoHa::inject(torch::nn::Module& module) {
  return inject_adapters(
      module, with_conv2d<LoHaConv2dImpl, LoHaParameters>(
                  linear_targeting<LoHaLinearImpl, LoHaParameters>(
                      "LoHa", "LOHA", adapter_name_, config_.target_modules,
                      [this](const std::string& name) { return config_.select(name); }),
                  zero_padded_delta_refusal("LoHa")));
}

void LoHa::merge(torch::nn::Module& module) {
  merge_adapter(
      module, [this](const std::string& name) { return config_.select(name).has_value(); }, adapter_name_);
}

hf::LoHaConfig loha_config_of(const torch::nn::Module& module, const std::string& adapter_name) {
  hf::LoHaConfig config;
  std::string first;
  for (const auto& entry : adapter_layers(module)) {
    if (!entry.layer->has_adapter(adapter_name)) continue;
    const auto* layer = dynamic_cast<const LoHaLayerImpl*>(entry.layer);
    if (!layer) {
      throw PeftError(fmt::format("save_adapter: '{}' holds adapter \"{}\" of another method ({})", entry.name,
                                  adapter_name, entry.layer->peft_type()));
    }
    const LoHaParameters& o = layer->adapter(adapter_name).options();
    config.target_modules.names.push_back(entry.name);
    if (first.empty()) {
      first = entry.name;
      config.r = o.r();
      config.alpha = o.alpha();
      config.rank_dropout = o.rank_dropout();
      config.module_dropout = o.module_dropout();
      config.init_weights = o.init_weights();
      config.use_effective_conv2d = o.use_effective_conv2d();
      continue;
    }
    if (o.rank_dropout() != config.rank_dropout || o.module_dropout() != config.module_dropout ||
        o.use_effective_conv2d() != config.use_effective_conv2d) {
      throw PeftError(fmt::format("save_adapter: '{}' differs from '{}' in rank_dropout, module_dropout or "
                                  "use_effective_conv2d, which a PEFT LoHa config cannot express per module",
                                  entry.name, first));
    }
    if (o.r() != config.r) config.rank_pattern.emplace_back(hf::detail::regex_escape(entry.name), o.r());
    if (o.alpha() != config.alpha) config.alpha_pattern.emplace_back(hf::detail::regex_escape(entry.name), o.alpha());
  }
  if (first.empty()) throw PeftError(fmt::format("save_adapter: no layer holds adapter \"{}\"", adapter_name));
  return config;
}

namespace {

constexpr std::array<const char*, 6> kFactorNames = {"hada_w1_a", "hada_w1_b", "hada_w2_a",
                                                     "hada_w2_b", "hada_t1",   "hada_t2"};
constexpr size_t kFlatFactors = 4;

std::string shapes_of(const std::array<at::Tensor, 6>& f, size_t n) {
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) out.push_back(fmt::format("{} [{}]", kFactorNames[i], fmt::join(f[i].sizes(), ", ")));
  return fmt::format("{}", fmt::join(out, ", "));
}

/// LoHa's offline merge: `<path>.hada_w{1,2}_{a,b}` (and in CP form on a
/// Conv2d `<path>.hada_t{1,2}`) build `ΔW`, added to `<path>.weight`.
class LoHaOfflineMerge : public hf::OfflineMerge {
 public:
  LoHaOfflineMerge(const hf::AdapterFiles& files, double scale) : source_(files.weights_path), scale_(scale) {
    const hf::LoHaConfig config = hf::parse_loha_config(files.config, files.config_path);
    for (const auto& [key, tensor] : files.tensors) {
      const std::string path = key.rfind(hf::kPeftKeyPrefix, 0) == 0 ? key.substr(hf::kPeftKeyPrefix.size()) : key;
      const auto dot = path.rfind('.');
      const std::string leaf = dot == std::string::npos ? path : path.substr(dot + 1);
      const auto it = std::find(kFactorNames.begin(), kFactorNames.end(), leaf);
      if (dot == std::string::npos || it == kFactorNames.end()) {
        throw PeftError(fmt::format("{}: '{}' is not a LoHa weight (expected keys ending in {})", source_, key,
                                    fmt::join(kFactorNames, ", ")));
      }
      const std::string module = path.substr(0, dot);
      const auto options = config.select(module);
      if (!options) {
        throw PeftError(fmt::format("{}: the adapter holds '{}' but adapter_config.json does not target '{}'",
                                    source_, key, module));
      }
      Module& m = modules_[module];
      m.options = *options;
      m.keys[it - kFactorNames.begin()] = key;
      m.factors[it - kFactorNames.begin()] = tensor;
    }
    if (modules_.empty()) throw PeftError(fmt::format("{}: the adapter holds no weights", source_));
    for (auto& [module, m] : modules_) {
      m.cp = m.factors[4].defined() || m.factors[5].defined();
      for (size_t i = 0; i < (m.cp ? kFactorNames.size() : kFlatFactors); ++i) {
        if (!m.factors[i].defined()) {
          throw PeftError(fmt::format("{}: '{}' has LoHa weights but no {} (a LoHa layer holds all of {}{})", source_,
                                      module, kFactorNames[i], fmt::join(kFactorNames.begin(), kFactorNames.begin() + kFlatFactors, ", "),
                                      m.cp ? ", and in CP form hada_t1, hada_t2" : ""));
        }
      }
    }
  }

  std::vector<std::string> target_keys(const model_state::KeySet&) const override {
    std::vector<std::string> keys;
    for (const auto& entry : modules_) keys.push_back(entry.first + ".weight");
    return keys;
  }

  void check(const std::string& key, const at::Tensor& base, bool allow_non_finite) const override {
    const Module& m = module_of(key);
    if (!at::isFloatingType(base.scalar_type())) {
      throw PeftError(fmt::format("'{}' has dtype {} in the base checkpoint; LoHa merges into floating-point weights "
                                  "only",
                                  key, c10::toString(base.scalar_type())));
    }
    const auto& f = m.factors;
    if (base.dim() != 2 && base.dim() != 4) {
      throw PeftError(fmt::format("'{}' has shape [{}]; LoHa adapts linear weights [out, in] and Conv2d weights "
                                  "[out, in/groups, kh, kw] (wrong base model?)",
                                  key, fmt::join(base.sizes(), ", ")));
    }
    // The layout PEFT would build for this layer: the adapter must hold exactly it.
    const LoHaParameters& o = m.options;
    const int64_t r = o.r(), out = base.size(0);
    const bool conv = base.dim() == 4;
    const bool cp = conv && o.use_effective_conv2d() && (base.size(2) != 1 || base.size(3) != 1);
    std::vector<std::vector<int64_t>> expected;
    if (cp) {
      expected = {{r, out}, {r, base.size(1)}, {r, out}, {r, base.size(1)}, {r, r, base.size(2), base.size(3)},
                  {r, r, base.size(2), base.size(3)}};
    } else {
      const int64_t in = base.numel() / out;
      expected = {{out, r}, {r, in}, {out, r}, {r, in}};
    }
    bool fits = m.cp == cp;
    for (size_t i = 0; i < expected.size(); ++i) fits = fits && f[i].sizes() == at::IntArrayRef(expected[i]);
    if (!fits) {
      std::vector<std::string> want;
      for (size_t i = 0; i < expected.size(); ++i) {
        want.push_back(fmt::format("{} [{}]", kFactorNames[i], fmt::join(expected[i], ", ")));
      }
      throw PeftError(fmt::format("'{}' has shape [{}], for which PEFT's LoHa with r={}{} holds {}{}; the adapter "
                                  "holds {} for '{}' (wrong base model?)",
                                  key, fmt::join(base.sizes(), ", "), r,
                                  conv ? fmt::format(", use_effective_conv2d={}", o.use_effective_conv2d()) : "",
                                  fmt::join(want, ", "), cp ? " (the CP form)" : "",
                                  shapes_of(f, m.cp ? f.size() : kFlatFactors), key.substr(0, key.rfind('.'))));
    }
    if (allow_non_finite) return;
    for (size_t i = 0; i < (m.cp ? f.size() : kFlatFactors); ++i) {
      if (detail::count_non_finite(f[i]) > 0) {
        throw PeftError(fmt::format("{}: '{}' holds NaN or Inf; merging it would write them into '{}'. Nothing was "
                                    "written. Fix or retrain the adapter, or merge anyway with --allow-non-finite",
                                    source_, m.keys[i], key));
      }
    }
  }

  at::Tensor merge(const std::string& key, const at::Tensor& base, bool allow_non_finite) const override {
    const Module& m = module_of(key);
    const auto& f = m.factors;
    const double scale = m.options.alpha() / static_cast<double>(m.options.r());
    at::Tensor delta = m.cp ? loha::delta_weight_cp(f[4], f[0], f[1], f[5], f[2], f[3], scale)
                            : loha::delta_weight(f[0], f[1], f[2], f[3], scale).reshape(base.sizes());
    if (scale_ != 1.0) delta = delta * scale_;
    const at::Tensor out = added_delta(base, delta.to(base.device()));
    if (!allow_non_finite && detail::count_non_finite(out) > 0) {
      throw PeftError(fmt::format("merging into '{}' gives NaN or Inf values (the sum overflows {}). Nothing was "
                                  "written; merge anyway with --allow-non-finite",
                                  key, c10::toString(out.scalar_type())));
    }
    return out;
  }

 private:
  struct Module {
    std::array<std::string, 6> keys;
    std::array<at::Tensor, 6> factors;
    LoHaParameters options;
    bool cp = false;  // the adapter holds hada_t1 / hada_t2
  };
  const Module& module_of(const std::string& key) const { return modules_.at(key.substr(0, key.rfind('.'))); }
  std::string source_;
  double scale_;
  std::map<std::string, Module> modules_;
};

}  // namespace

PeftMethodRegistration loha_registration() {
  PeftMethodRegistration r = d9d_config_registration<LoHaConfig, LoHa>(&parse_loha_config_json);
  r.peft_type = "LOHA";
  r.load_hf_config = [](const nlohmann::json& j, const std::string& source,
                        const std::string& adapter_name) -> std::unique_ptr<PeftMethodBase> {
    return std::make_unique<LoHa>(hf::parse_loha_config(j, source), adapter_name);
  };
  r.write_hf_config = [](const torch::nn::Module& model, const std::string& adapter_name,
                         const hf::SaveAdapterOptions& options) {
    hf::LoHaConfig config = loha_config_of(model, adapter_name);
    config.base_model_name_or_path = options.base_model_name_or_path;
    config.task_type = options.task_type;
    return hf::dump_loha_config(config);
  };
  r.plan_offline_merge = [](const hf::AdapterFiles& files, double scale) -> std::unique_ptr<hf::OfflineMerge> {
    return std::make_unique<LoHaOfflineMerge>(files, scale);
  };
  return r;
}

}  // namespace d9d::peft
