// The LoKr method: injection, merge, the offline merge and its registration
// under PEFT's peft_type "LOKR".
#include <d9d/peft/adapters.h>
#include <d9d/peft/delta_layer.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/merge.h>
#include <d9d/peft/inject.h>
#include <d9d/peft/linear_targeting.h>
#include <d9d/peft/lokr/math.h>
#include <d9d/peft/lokr/method.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../builtin_methods.h"
#include "../hf/config_rules.h"
#include "../non_finite.h"

#include <algorithm>
#include <map>

namespace d9d::peft {

LoKr::LoKr(hf::LoKrConfig config, std::string adapter_name)
    : PeftMethod(std::move(config)), adapter_name_(std::move(adapter_name)) {
  validate(config_);
  validate_adapter_name(adapter_name_);
}

LoKr LoKr::from_config(const LoKrConfig& config) {
  validate(config);
  return LoKr(to_peft_config(config));
}

PeftInjectionResult LoKr::inject(torch::nn::Module& module) {
  return inject_adapters(
      module, with_conv2d<LoKrConv2dImpl, LoKrParameters>(
                  linear_targeting<LoKrLinearImpl, LoKrParameters>(
                      "LoKr", "LOKR", adapter_name_, config_.target_modules,
                      [this](const std::string& name) { return config_.select(name); }),
                  zero_padded_delta_refusal("LoKr")));
}

void LoKr::merge(torch::nn::Module& module) {
  merge_adapter(
      module, [this](const std::string& name) { return config_.select(name).has_value(); }, adapter_name_);
}

hf::LoKrConfig lokr_config_of(const torch::nn::Module& module, const std::string& adapter_name) {
  hf::LoKrConfig config;
  std::string first;
  for (const auto& entry : adapter_layers(module)) {
    if (!entry.layer->has_adapter(adapter_name)) continue;
    const auto* layer = dynamic_cast<const LoKrLayerImpl*>(entry.layer);
    if (!layer) {
      throw PeftError(fmt::format("save_adapter: '{}' holds adapter \"{}\" of another method ({})", entry.name,
                                  adapter_name, entry.layer->peft_type()));
    }
    const LoKrParameters& o = layer->adapter(adapter_name).options();
    config.target_modules.names.push_back(entry.name);
    if (first.empty()) {
      first = entry.name;
      config.r = o.r();
      config.alpha = o.alpha();
      config.rank_dropout = o.rank_dropout();
      config.module_dropout = o.module_dropout();
      config.rank_dropout_scale = o.rank_dropout_scale();
      config.decompose_both = o.decompose_both();
      config.decompose_factor = o.decompose_factor();
      config.use_effective_conv2d = o.use_effective_conv2d();
      config.init_weights = o.init_weights();
      continue;
    }
    // PEFT's config holds these once for every layer; decompose_* decide the key layout.
    if (o.rank_dropout() != config.rank_dropout || o.module_dropout() != config.module_dropout ||
        o.rank_dropout_scale() != config.rank_dropout_scale || o.decompose_both() != config.decompose_both ||
        o.decompose_factor() != config.decompose_factor || o.use_effective_conv2d() != config.use_effective_conv2d) {
      throw PeftError(fmt::format("save_adapter: '{}' differs from '{}' in rank_dropout, module_dropout, "
                                  "rank_dropout_scale, decompose_both, decompose_factor or use_effective_conv2d, "
                                  "which a PEFT LoKr config cannot express per module",
                                  entry.name, first));
    }
    if (o.r() != config.r) config.rank_pattern.emplace_back(hf::detail::regex_escape(entry.name), o.r());
    if (o.alpha() != config.alpha) config.alpha_pattern.emplace_back(hf::detail::regex_escape(entry.name), o.alpha());
  }
  if (first.empty()) throw PeftError(fmt::format("save_adapter: no layer holds adapter \"{}\"", adapter_name));
  return config;
}

namespace {

/// The factors of one LoKr layer in an adapter file, by key leaf (`lokr_w1`, ...).
struct LoKrFactors {
  std::map<std::string, std::pair<std::string, at::Tensor>> by_leaf;  // leaf -> (file key, tensor)
  LoKrParameters options;

  bool has(const char* leaf) const { return by_leaf.count(leaf) > 0; }
  const at::Tensor& get(const char* leaf) const { return by_leaf.at(leaf).second; }
  /// `w1` or `w2` (`side` "1" or "2"): whole, the product of its two parts,
  /// or (`w2` of a Conv2d in CP form) built from `lokr_t2`.
  at::Tensor factor(const std::string& side) const {
    const std::string whole = "lokr_w" + side;
    if (has(whole.c_str())) return get(whole.c_str());
    const at::Tensor& a = get((whole + "_a").c_str());
    const at::Tensor& b = get((whole + "_b").c_str());
    if (side == "2" && has("lokr_t2")) return lokr::cp_weight(get("lokr_t2"), a, b);
    return at::mm(a, b);
  }
  /// ΔW in the shape of `base`, the weight it merges into.
  at::Tensor delta(at::IntArrayRef base) const {
    return lokr::delta_weight(factor("1"), factor("2"), options.alpha() / static_cast<double>(options.r()))
        .reshape(base);
  }
};

const std::vector<std::string> kLeaves = {"lokr_w1",   "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                          "lokr_w2_a", "lokr_w2_b", "lokr_t2"};

/// LoKr's offline merge: `<path>.lokr_w{1,2}[_a,_b]` build `ΔW`, added to `<path>.weight`.
class LoKrOfflineMerge : public hf::OfflineMerge {
 public:
  LoKrOfflineMerge(const hf::AdapterFiles& files, double scale) : source_(files.weights_path), scale_(scale) {
    const hf::LoKrConfig config = hf::parse_lokr_config(files.config, files.config_path);
    for (const auto& [key, tensor] : files.tensors) {
      const std::string path = key.rfind(hf::kPeftKeyPrefix, 0) == 0 ? key.substr(hf::kPeftKeyPrefix.size()) : key;
      const auto dot = path.rfind('.');
      const std::string leaf = dot == std::string::npos ? path : path.substr(dot + 1);
      if (dot == std::string::npos || std::find(kLeaves.begin(), kLeaves.end(), leaf) == kLeaves.end()) {
        throw PeftError(fmt::format("{}: '{}' is not a LoKr weight (expected keys ending in {})", source_, key,
                                    fmt::join(kLeaves, ", ")));
      }
      const std::string module = path.substr(0, dot);
      const auto options = config.select(module);
      if (!options) {
        throw PeftError(fmt::format("{}: the adapter holds '{}' but adapter_config.json does not target '{}'",
                                    source_, key, module));
      }
      LoKrFactors& m = modules_[module];
      m.options = *options;
      m.by_leaf[leaf] = {key, tensor};
    }
    if (modules_.empty()) throw PeftError(fmt::format("{}: the adapter holds no weights", source_));
    for (const auto& [module, m] : modules_) {
      for (const std::string side : {"1", "2"}) {
        const std::string whole = "lokr_w" + side, a = whole + "_a", b = whole + "_b";
        const int parts = m.has(a.c_str()) + m.has(b.c_str());
        if (m.has(whole.c_str()) ? parts != 0 : parts != 2) {
          throw PeftError(fmt::format("{}: '{}' must hold either {} or both {} and {}", source_, module, whole, a, b));
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
    const LoKrFactors& m = module_of(key);
    if (!at::isFloatingType(base.scalar_type())) {
      throw PeftError(fmt::format("'{}' has dtype {} in the base checkpoint; LoKr merges into floating-point weights "
                                  "only",
                                  key, c10::toString(base.scalar_type())));
    }
    std::vector<std::string> held;
    for (const auto& [leaf, entry] : m.by_leaf) held.push_back(fmt::format("{} [{}]", leaf, fmt::join(entry.second.sizes(), ", ")));
    if (base.dim() != 2 && base.dim() != 4) {
      throw PeftError(fmt::format("'{}' has shape [{}]; LoKr adapts linear weights [out, in] and Conv2d weights "
                                  "[out, in/groups, kh, kw] (wrong base model?)",
                                  key, fmt::join(base.sizes(), ", ")));
    }
    // The layout PEFT would build for this layer: the adapter must hold exactly it.
    const LoKrParameters& o = m.options;
    const lokr::FactorShape s =
        base.dim() == 4 ? lokr::conv_shape(base.size(1), base.size(0), base.size(2), base.size(3), o.r(),
                                           o.decompose_both(), o.decompose_factor(), o.use_effective_conv2d())
                        : lokr::linear_shape(base.size(1), base.size(0), o.r(), o.decompose_both(),
                                             o.decompose_factor());
    const int64_t r = o.r();
    const bool conv = s.kh > 0;
    std::map<std::string, std::vector<int64_t>> expected;
    if (s.whole_w1) {
      expected["lokr_w1"] = {s.a, s.c};
    } else {
      expected["lokr_w1_a"] = {s.a, r};
      expected["lokr_w1_b"] = {r, s.c};
    }
    if (s.whole_w2) {
      expected["lokr_w2"] = conv ? std::vector<int64_t>{s.b, s.d, s.kh, s.kw} : std::vector<int64_t>{s.b, s.d};
    } else if (s.cp) {
      expected["lokr_w2_a"] = {r, s.b};
      expected["lokr_w2_b"] = {r, s.d};
      expected["lokr_t2"] = {r, r, s.kh, s.kw};
    } else {
      expected["lokr_w2_a"] = {s.b, r};
      expected["lokr_w2_b"] = {r, conv ? s.d * s.kh * s.kw : s.d};
    }
    bool fits = expected.size() == m.by_leaf.size();
    for (const auto& [leaf, sizes] : expected) {
      fits = fits && m.has(leaf.c_str()) && m.get(leaf.c_str()).sizes() == at::IntArrayRef(sizes);
    }
    if (!fits) {
      std::vector<std::string> want;
      for (const auto& [leaf, sizes] : expected) want.push_back(fmt::format("{} [{}]", leaf, fmt::join(sizes, ", ")));
      throw PeftError(fmt::format("'{}' has shape [{}], for which PEFT's LoKr with r={}, decompose_both={}, "
                                  "decompose_factor={}{} holds {}; the adapter holds {} for '{}' (wrong base model?)",
                                  key, fmt::join(base.sizes(), ", "), r, o.decompose_both(), o.decompose_factor(),
                                  conv ? fmt::format(", use_effective_conv2d={}", o.use_effective_conv2d()) : "",
                                  fmt::join(want, ", "), fmt::join(held, ", "), key.substr(0, key.rfind('.'))));
    }
    if (allow_non_finite) return;
    for (const auto& [leaf, entry] : m.by_leaf) {
      if (detail::count_non_finite(entry.second) > 0) {
        throw PeftError(fmt::format("{}: '{}' holds NaN or Inf; merging it would write them into '{}'. Nothing was "
                                    "written. Fix or retrain the adapter, or merge anyway with --allow-non-finite",
                                    source_, entry.first, key));
      }
    }
  }

  at::Tensor merge(const std::string& key, const at::Tensor& base, bool allow_non_finite) const override {
    at::Tensor delta = module_of(key).delta(base.sizes());
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
  const LoKrFactors& module_of(const std::string& key) const { return modules_.at(key.substr(0, key.rfind('.'))); }
  std::string source_;
  double scale_;
  std::map<std::string, LoKrFactors> modules_;
};

}  // namespace

PeftMethodRegistration lokr_registration() {
  PeftMethodRegistration r = d9d_config_registration<LoKrConfig, LoKr>(&parse_lokr_config_json);
  r.peft_type = "LOKR";
  r.load_hf_config = [](const nlohmann::json& j, const std::string& source,
                        const std::string& adapter_name) -> std::unique_ptr<PeftMethodBase> {
    return std::make_unique<LoKr>(hf::parse_lokr_config(j, source), adapter_name);
  };
  r.write_hf_config = [](const torch::nn::Module& model, const std::string& adapter_name,
                         const hf::SaveAdapterOptions& options) {
    hf::LoKrConfig config = lokr_config_of(model, adapter_name);
    config.base_model_name_or_path = options.base_model_name_or_path;
    config.task_type = options.task_type;
    return hf::dump_lokr_config(config);
  };
  r.plan_offline_merge = [](const hf::AdapterFiles& files, double scale) -> std::unique_ptr<hf::OfflineMerge> {
    return std::make_unique<LoKrOfflineMerge>(files, scale);
  };
  return r;
}

}  // namespace d9d::peft
