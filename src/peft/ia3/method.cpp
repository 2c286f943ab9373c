// The IA3 method: injection, merge, the offline merge and its registration
// under PEFT's peft_type "IA3".
#include <d9d/peft/adapters.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/merge.h>
#include <d9d/peft/ia3/math.h>
#include <d9d/peft/ia3/method.h>
#include <d9d/peft/inject.h>
#include <d9d/peft/linear_targeting.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../builtin_methods.h"
#include "../non_finite.h"

#include <map>

namespace d9d::peft {

IA3::IA3(hf::IA3Config config, std::string adapter_name)
    : PeftMethod(std::move(config)), adapter_name_(std::move(adapter_name)) {
  validate(config_);
  validate_adapter_name(adapter_name_);
}

IA3 IA3::from_config(const IA3Config& config) {
  validate(config);
  return IA3(to_peft_config(config));
}

PeftInjectionResult IA3::inject(torch::nn::Module& module) {
  return inject_adapters(module, with_conv2d<IA3Conv2dImpl, IA3Parameters>(linear_targeting<IA3LinearImpl, IA3Parameters>(
                                     "IA3", "IA3", adapter_name_, config_.target_modules,
                                     [this](const std::string& name) { return config_.select(name); })));
}

void IA3::merge(torch::nn::Module& module) {
  merge_adapter(
      module, [this](const std::string& name) { return config_.select(name).has_value(); }, adapter_name_);
}

hf::IA3Config ia3_config_of(const torch::nn::Module& module, const std::string& adapter_name) {
  hf::IA3Config config;
  for (const auto& entry : adapter_layers(module)) {
    if (!entry.layer->has_adapter(adapter_name)) continue;
    const auto* layer = dynamic_cast<const IA3LayerImpl*>(entry.layer);
    if (!layer) {
      throw PeftError(fmt::format("save_adapter: '{}' holds adapter \"{}\" of another method ({})", entry.name,
                                  adapter_name, entry.layer->peft_type()));
    }
    config.target_modules.names.push_back(entry.name);
    // Whole names: PEFT's suffix rule then matches exactly these layers.
    if (layer->feedforward()) config.feedforward_modules.names.push_back(entry.name);
  }
  if (config.target_modules.names.empty()) {
    throw PeftError(fmt::format("save_adapter: no layer holds adapter \"{}\"", adapter_name));
  }
  return config;
}

namespace {

/// IA3's offline merge: `<path>.ia3_l` scales `<path>.weight` (and, unless
/// feed-forward, `<path>.bias`).
class IA3OfflineMerge : public hf::OfflineMerge {
 public:
  IA3OfflineMerge(const hf::AdapterFiles& files, double scale) : source_(files.weights_path) {
    if (scale != 1.0) {
      throw PeftError(fmt::format("{}: an IA3 adapter scales weights; --scale {} has no meaning for it (use 1)",
                                  files.config_path, scale));
    }
    const hf::IA3Config config = hf::parse_ia3_config(files.config, files.config_path);
    const std::string suffix = ".ia3_l";
    for (const auto& [key, tensor] : files.tensors) {
      std::string path = key.rfind(hf::kPeftKeyPrefix, 0) == 0 ? key.substr(hf::kPeftKeyPrefix.size()) : key;
      if (path.size() <= suffix.size() || path.compare(path.size() - suffix.size(), suffix.size(), suffix) != 0) {
        throw PeftError(fmt::format("{}: '{}' is not an IA3 weight (expected keys ending in ia3_l)", source_, key));
      }
      path.resize(path.size() - suffix.size());
      const auto options = config.select(path);
      if (!options) {
        throw PeftError(fmt::format("{}: the adapter holds '{}' but adapter_config.json does not target '{}'",
                                    source_, key, path));
      }
      modules_[path] = {key, tensor, options->feedforward()};
    }
    if (modules_.empty()) throw PeftError(fmt::format("{}: the adapter holds no weights", source_));
  }

  std::vector<std::string> target_keys(const model_state::KeySet& base_keys) const override {
    std::vector<std::string> keys;
    for (const auto& [path, m] : modules_) {
      keys.push_back(path + ".weight");
      if (!m.feedforward && base_keys.count(path + ".bias")) keys.push_back(path + ".bias");
    }
    return keys;
  }

  void check(const std::string& key, const at::Tensor& base, bool allow_non_finite) const override {
    const auto& [path, m] = module_of(key);
    if (!at::isFloatingType(base.scalar_type())) {
      throw PeftError(fmt::format("'{}' has dtype {} in the base checkpoint; IA3 merges into floating-point weights "
                                  "only",
                                  key, c10::toString(base.scalar_type())));
    }
    if (key == path + ".weight") {
      bool fits = false;
      if (base.dim() == 2) {
        const std::vector<int64_t> expected =
            m.feedforward ? std::vector<int64_t>{1, base.size(1)} : std::vector<int64_t>{base.size(0), 1};
        fits = m.l.sizes().vec() == expected;
      } else if (base.dim() == 4) {
        fits = conv_groups(m, base) > 0;
      }
      if (!fits) {
        throw PeftError(fmt::format(
            "'{}' has shape [{}] but '{}' has shape [{}] ({}; wrong base model?)", m.key, fmt::join(m.l.sizes(), ", "),
            key, fmt::join(base.sizes(), ", "),
            base.dim() == 4 ? (m.feedforward ? "on a Conv2d weight [out, in / groups, kh, kw] a feed-forward vector "
                                               "is [1, in, 1, 1]"
                                             : "on a Conv2d weight [out, in / groups, kh, kw] a vector is [1, out, 1, 1]")
                            : (m.feedforward ? "on a Linear weight [out, in] a feed-forward vector is [1, in]"
                                             : "on a Linear weight [out, in] a vector is [out, 1]")));
      }
    }
    if (!allow_non_finite && detail::count_non_finite(m.l) > 0) {
      throw PeftError(fmt::format("{}: '{}' holds NaN or Inf; merging it would write them into '{}'. Nothing was "
                                  "written. Fix or retrain the adapter, or merge anyway with --allow-non-finite",
                                  source_, m.key, key));
    }
  }

  at::Tensor merge(const std::string& key, const at::Tensor& base, bool allow_non_finite) const override {
    const auto& [path, m] = module_of(key);
    at::Tensor out;
    if (key != path + ".weight") {
      out = ia3::merged_bias(base, m.l);
    } else if (base.dim() == 4) {
      out = ia3::merged_weight(base, ia3::conv_weight_scale(m.l, m.feedforward, conv_groups(m, base), base.size(0)));
    } else {
      out = ia3::merged_weight(base, m.l);
    }
    if (!allow_non_finite && detail::count_non_finite(out) > 0) {
      throw PeftError(fmt::format("merging into '{}' gives NaN or Inf values (the product overflows {}). Nothing was "
                                  "written; merge anyway with --allow-non-finite",
                                  key, c10::toString(out.scalar_type())));
    }
    return out;
  }

 private:
  struct Module {
    std::string key;
    at::Tensor l;
    bool feedforward = false;
  };
  /// The groups of the Conv2d weight `base` `[out, in / groups, kh, kw]` that
  /// `m.l` `[1, F, 1, 1]` fits (F = out; or in, with groups = in / base.size(1),
  /// on a feed-forward layer), or 0 when it does not fit.
  static int64_t conv_groups(const Module& m, const at::Tensor& base) {
    if (m.l.dim() != 4 || m.l.size(0) != 1 || m.l.size(2) != 1 || m.l.size(3) != 1) return 0;
    if (!m.feedforward) return m.l.size(1) == base.size(0) ? 1 : 0;
    const int64_t in = m.l.size(1), per_group = base.size(1);
    if (per_group == 0 || in % per_group != 0) return 0;
    const int64_t groups = in / per_group;
    return base.size(0) % groups == 0 ? groups : 0;
  }
  std::pair<std::string, const Module&> module_of(const std::string& key) const {
    const std::string path = key.substr(0, key.rfind('.'));
    return {path, modules_.at(path)};
  }
  std::string source_;
  std::map<std::string, Module> modules_;
};

}  // namespace

PeftMethodRegistration ia3_registration() {
  PeftMethodRegistration r = d9d_config_registration<IA3Config, IA3>(&parse_ia3_config_json);
  r.peft_type = "IA3";
  r.load_hf_config = [](const nlohmann::json& j, const std::string& source,
                        const std::string& adapter_name) -> std::unique_ptr<PeftMethodBase> {
    return std::make_unique<IA3>(hf::parse_ia3_config(j, source), adapter_name);
  };
  r.write_hf_config = [](const torch::nn::Module& model, const std::string& adapter_name,
                         const hf::SaveAdapterOptions& options) {
    hf::IA3Config config = ia3_config_of(model, adapter_name);
    config.base_model_name_or_path = options.base_model_name_or_path;
    config.task_type = options.task_type;
    return hf::dump_ia3_config(config);
  };
  r.plan_offline_merge = [](const hf::AdapterFiles& files, double scale) -> std::unique_ptr<hf::OfflineMerge> {
    return std::make_unique<IA3OfflineMerge>(files, scale);
  };
  return r;
}

}  // namespace d9d::peft
