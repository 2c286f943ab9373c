// The VeRA method: injection with one pair of projections per adapter, merge,
// the offline merge and its registration under PEFT's peft_type "VERA".
#include <d9d/peft/adapters.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/merge.h>
#include <d9d/peft/inject.h>
#include <d9d/peft/linear_targeting.h>
#include <d9d/peft/module_tree.h>
#include <d9d/peft/vera/math.h>
#include <d9d/peft/vera/method.h>

#include <ATen/Functions.h>
#include <torch/nn/modules/linear.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../builtin_methods.h"
#include "../non_finite.h"

#include <algorithm>
#include <map>

namespace d9d::peft {

namespace {

/// The weight of a layer VeRA adapts (a linear layer, or a VeRA layer's base), or undefined.
at::Tensor adaptable_weight(const torch::nn::Module& m) {
  if (const auto* l = m.as<d9d::nn::LinearImpl>()) return l->weight;
  if (const auto* l = m.as<torch::nn::LinearImpl>()) return l->weight;
  if (const auto* l = m.as<VeraLinearImpl>()) return l->base_weight();
  return {};
}

std::string shape_str(at::IntArrayRef sizes) { return fmt::format("[{}]", fmt::join(sizes, ", ")); }

}  // namespace

Vera::Vera(hf::VeraConfig config, std::string adapter_name)
    : PeftMethod(std::move(config)), adapter_name_(std::move(adapter_name)) {
  validate(config_);
  validate_adapter_name(adapter_name_);
}

Vera Vera::from_config(const VeraConfig& config) {
  validate(config);
  return Vera(to_peft_config(config));
}

PeftInjectionResult Vera::inject(torch::nn::Module& module) {
  // PEFT's _find_dim: one pair of projections for the adapter, sized for the
  // largest selected layer in each dimension, drawn before any layer is built.
  int64_t max_out = 0, max_in = 0;
  at::TensorOptions like;
  for (const auto& entry : list_modules(module, /*enter_adapters=*/false)) {
    if (!config_.select(entry.name)) continue;
    const at::Tensor w = adaptable_weight(*entry.module);
    if (!w.defined()) continue;
    if (max_out == 0) like = w.options();
    max_out = std::max(max_out, w.size(0));
    max_in = std::max(max_in, w.size(1));
  }
  at::Tensor vera_A, vera_B;
  if (max_out > 0) {
    std::tie(vera_A, vera_B) = vera::projections(config_.r, max_out, max_in, config_.projection_prng_key);
    vera_A = vera_A.to(like);
    vera_B = vera_B.to(like);
  }
  return inject_adapters(
      module, linear_targeting<VeraLinearImpl, VeraParameters>(
                  "VeRA", "VERA", adapter_name_, config_.target_modules,
                  [this, vera_A, vera_B](const std::string& name) -> std::optional<VeraParameters> {
                    auto options = config_.select(name);
                    if (!options) return std::nullopt;
                    return options->vera_A(vera_A).vera_B(vera_B);
                  }));
}

void Vera::merge(torch::nn::Module& module) {
  merge_adapter(
      module, [this](const std::string& name) { return config_.select(name).has_value(); }, adapter_name_);
}

hf::VeraConfig vera_config_of(const torch::nn::Module& module, const std::string& adapter_name) {
  hf::VeraConfig config;
  std::string first;
  for (const auto& entry : adapter_layers(module)) {
    if (!entry.layer->has_adapter(adapter_name)) continue;
    const auto* layer = dynamic_cast<const VeraLinearImpl*>(entry.layer);
    if (!layer) {
      throw PeftError(fmt::format("save_adapter: '{}' holds adapter \"{}\" of another method ({})", entry.name,
                                  adapter_name, entry.layer->peft_type()));
    }
    const VeraParameters& o = layer->adapter(adapter_name).options();
    config.target_modules.names.push_back(entry.name);
    if (first.empty()) {
      first = entry.name;
      config.r = o.r();
      config.projection_prng_key = o.projection_prng_key();
      config.save_projection = o.save_projection();
      config.vera_dropout = o.vera_dropout();
      config.d_initial = o.d_initial();
      config.init_weights = o.init_weights();
      continue;
    }
    if (o.r() != config.r || o.projection_prng_key() != config.projection_prng_key ||
        o.save_projection() != config.save_projection || o.vera_dropout() != config.vera_dropout ||
        o.d_initial() != config.d_initial || o.init_weights() != config.init_weights) {
      throw PeftError(fmt::format("save_adapter: '{}' differs from '{}' in r, projection_prng_key, save_projection, "
                                  "vera_dropout, d_initial or init_weights, which a PEFT VeRA config cannot express "
                                  "per module",
                                  entry.name, first));
    }
  }
  if (first.empty()) throw PeftError(fmt::format("save_adapter: no layer holds adapter \"{}\"", adapter_name));
  return config;
}

namespace {

/// `save_projection` false writes no projections: PEFT draws them again from
/// the key. Refuses (before anything is written) an adapter whose projections
/// are not the ones the key gives, which such a file would silently lose.
void check_projections_regenerate(const torch::nn::Module& module, const std::string& adapter_name,
                                  const hf::VeraConfig& config) {
  for (const auto& entry : adapter_layers(module)) {
    if (!entry.layer->has_adapter(adapter_name)) continue;
    const auto& a = dynamic_cast<const VeraLinearImpl&>(*entry.layer).adapter(adapter_name);
    const auto [A, B] = vera::projections(config.r, a.vera_B.size(0), a.vera_A.size(1), config.projection_prng_key);
    // Drawn in float32 and cast to the layer's dtype, as inject and PEFT's loader do.
    const auto held = [](const at::Tensor& t) { return t.to(at::kCPU); };
    if (!at::equal(A.to(a.vera_A.scalar_type()), held(a.vera_A)) ||
        !at::equal(B.to(a.vera_B.scalar_type()), held(a.vera_B))) {
      throw PeftError(fmt::format("save_adapter: adapter \"{}\" has save_projection false, but its projections are "
                                  "not the ones projection_prng_key {} draws (they were loaded from a file or "
                                  "changed), so a file without them would load other numbers. Nothing was written; "
                                  "save it with save_projection true",
                                  adapter_name, config.projection_prng_key));
    }
    return;  // every layer holds the same tensors (checked when the weights are gathered)
  }
}

const std::string kProjectionKeys[] = {"base_model.vera_A", "base_model.vera_B"};

/// VeRA's offline merge: `<path>.vera_lambda_{b,d}` and the shared
/// projections (from the file, or drawn from the key) build `ΔW`, added to
/// `<path>.weight`.
class VeraOfflineMerge : public hf::OfflineMerge {
 public:
  VeraOfflineMerge(const hf::AdapterFiles& files, double scale)
      : source_(files.weights_path), scale_(scale), config_(hf::parse_vera_config(files.config, files.config_path)) {
    for (const auto& [key, tensor] : files.tensors) {
      if (key == kProjectionKeys[0] || key == kProjectionKeys[1]) {
        (key == kProjectionKeys[0] ? given_A_ : given_B_) = tensor;
        continue;
      }
      const std::string path = key.rfind(hf::kPeftKeyPrefix, 0) == 0 ? key.substr(hf::kPeftKeyPrefix.size()) : key;
      const auto dot = path.rfind('.');
      const std::string leaf = dot == std::string::npos ? path : path.substr(dot + 1);
      if (dot == std::string::npos || (leaf != "vera_lambda_b" && leaf != "vera_lambda_d")) {
        throw PeftError(fmt::format("{}: '{}' is not a VeRA weight (expected base_model.vera_A, base_model.vera_B and "
                                    "keys ending in vera_lambda_b, vera_lambda_d)",
                                    source_, key));
      }
      const std::string module = path.substr(0, dot);
      if (!config_.select(module)) {
        throw PeftError(fmt::format("{}: the adapter holds '{}' but adapter_config.json does not target '{}'",
                                    source_, key, module));
      }
      (leaf == "vera_lambda_b" ? modules_[module].lambda_b : modules_[module].lambda_d) = tensor;
    }
    if (modules_.empty()) throw PeftError(fmt::format("{}: the adapter holds no weights", source_));
    for (const auto& [module, m] : modules_) {
      if (!m.lambda_b.defined() || !m.lambda_d.defined()) {
        throw PeftError(fmt::format("{}: '{}' has VeRA weights but no {} (a VeRA layer holds vera_lambda_b and "
                                    "vera_lambda_d)",
                                    source_, module, m.lambda_b.defined() ? "vera_lambda_d" : "vera_lambda_b"));
      }
    }
    if (given_A_.defined() != given_B_.defined()) {
      throw PeftError(fmt::format("{}: the adapter holds {} but not {}", source_,
                                  given_A_.defined() ? kProjectionKeys[0] : kProjectionKeys[1],
                                  given_A_.defined() ? kProjectionKeys[1] : kProjectionKeys[0]));
    }
    if (config_.save_projection && !given_A_.defined()) {
      throw PeftError(fmt::format("{}: adapter_config.json says save_projection true but the file holds no "
                                  "base_model.vera_A / base_model.vera_B (PEFT refuses it too); set save_projection "
                                  "false to draw them from projection_prng_key {}",
                                  source_, config_.projection_prng_key));
    }
  }

  std::vector<std::string> target_keys(const model_state::KeySet&) const override {
    std::vector<std::string> keys;
    for (const auto& entry : modules_) keys.push_back(entry.first + ".weight");
    return keys;
  }

  void check(const std::string& key, const at::Tensor& base, bool allow_non_finite) const override {
    const std::string module = key.substr(0, key.rfind('.'));
    Module& m = modules_.at(module);
    if (!at::isFloatingType(base.scalar_type())) {
      throw PeftError(fmt::format("'{}' has dtype {} in the base checkpoint; VeRA merges into floating-point weights "
                                  "only",
                                  key, c10::toString(base.scalar_type())));
    }
    const int64_t r = config_.r;
    const bool fits = base.dim() == 2 && m.lambda_b.dim() == 1 && m.lambda_d.dim() == 1 &&
                      m.lambda_b.size(0) == base.size(0) && m.lambda_d.size(0) == r &&
                      (!given_A_.defined() || (given_A_.dim() == 2 && given_B_.dim() == 2 && given_A_.size(0) == r &&
                                               given_B_.size(1) == r && given_A_.size(1) >= base.size(1) &&
                                               given_B_.size(0) >= base.size(0)));
    if (!fits) {
      throw PeftError(fmt::format("'{}' has shape {} but VeRA's '{}' has vera_lambda_b {}, vera_lambda_d {}{} "
                                  "(expected [out], [r = {}]{}; wrong base model?)",
                                  key, shape_str(base.sizes()), module, shape_str(m.lambda_b.sizes()),
                                  shape_str(m.lambda_d.sizes()),
                                  given_A_.defined() ? fmt::format(", and the projections are vera_A {}, vera_B {}",
                                                                   shape_str(given_A_.sizes()),
                                                                   shape_str(given_B_.sizes()))
                                                     : std::string(),
                                  r, given_A_.defined() ? ", [r, >= in], [>= out, r]" : ""));
    }
    m.in_features = base.size(1);  // the projections drawn from the key are sized for the largest layer
    if (allow_non_finite) return;
    const std::pair<const char*, const at::Tensor*> tensors[] = {
        {"vera_lambda_b", &m.lambda_b}, {"vera_lambda_d", &m.lambda_d}, {"vera_A", &given_A_}, {"vera_B", &given_B_}};
    for (const auto& [name, t] : tensors) {
      if (t->defined() && detail::count_non_finite(*t) > 0) {
        throw PeftError(fmt::format("{}: {} of '{}' holds NaN or Inf; merging it would write them into '{}'. Nothing "
                                    "was written. Fix or retrain the adapter, or merge anyway with --allow-non-finite",
                                    source_, name, module, key));
      }
    }
  }

  at::Tensor merge(const std::string& key, const at::Tensor& base, bool allow_non_finite) const override {
    const Module& m = modules_.at(key.substr(0, key.rfind('.')));
    const auto& [A, B] = projections();
    at::Tensor delta = vera::delta_weight(A, B, m.lambda_b, m.lambda_d, base.size(1));
    if (scale_ != 1.0) delta = delta * scale_;
    const at::Tensor out = vera::merged_weight(base, delta);
    if (!allow_non_finite && detail::count_non_finite(out) > 0) {
      throw PeftError(fmt::format("merging into '{}' gives NaN or Inf values (the sum overflows {}). Nothing was "
                                  "written; merge anyway with --allow-non-finite",
                                  key, c10::toString(out.scalar_type())));
    }
    return out;
  }

 private:
  struct Module {
    at::Tensor lambda_b, lambda_d;
    int64_t in_features = 0;  // from the base, once checked
  };

  /// The file's projections, or (save_projection false) those the key draws
  /// for the largest layer, as PEFT does on loading; every layer must have
  /// been checked first (`merge_adapter_into_checkpoint` checks all before merging).
  const std::pair<at::Tensor, at::Tensor>& projections() const {
    if (projections_.first.defined()) return projections_;
    if (config_.save_projection) return projections_ = {given_A_, given_B_};
    int64_t max_out = 0, max_in = 0;
    for (const auto& [module, m] : modules_) {
      if (m.in_features == 0) throw PeftError(fmt::format("VeRA: '{}' was merged before it was checked", module));
      max_out = std::max(max_out, m.lambda_b.size(0));
      max_in = std::max(max_in, m.in_features);
    }
    projections_ = vera::projections(config_.r, max_out, max_in, config_.projection_prng_key);
    // PEFT ignores projections in a file whose config says they are not saved; refuse them unless they agree.
    if (given_A_.defined() &&
        !(given_A_.sizes() == projections_.first.sizes() && given_B_.sizes() == projections_.second.sizes() &&
          at::equal(given_A_.to(at::kFloat), projections_.first) &&
          at::equal(given_B_.to(at::kFloat), projections_.second))) {
      throw PeftError(fmt::format("{}: the file holds base_model.vera_A and vera_B although adapter_config.json says "
                                  "save_projection false, and they are not the ones projection_prng_key {} draws; "
                                  "set save_projection true to use the file's",
                                  source_, config_.projection_prng_key));
    }
    return projections_;
  }

  std::string source_;
  double scale_;
  hf::VeraConfig config_;
  at::Tensor given_A_, given_B_;
  // Filled by check (the layers' input sizes) and at the first merge (drawn projections).
  mutable std::map<std::string, Module> modules_;
  mutable std::pair<at::Tensor, at::Tensor> projections_;
};

}  // namespace

PeftMethodRegistration vera_registration() {
  PeftMethodRegistration r = d9d_config_registration<VeraConfig, Vera>(&parse_vera_config_json);
  r.peft_type = "VERA";
  r.load_hf_config = [](const nlohmann::json& j, const std::string& source,
                        const std::string& adapter_name) -> std::unique_ptr<PeftMethodBase> {
    return std::make_unique<Vera>(hf::parse_vera_config(j, source), adapter_name);
  };
  r.write_hf_config = [](const torch::nn::Module& model, const std::string& adapter_name,
                         const hf::SaveAdapterOptions& options) {
    hf::VeraConfig config = vera_config_of(model, adapter_name);
    if (!config.save_projection) check_projections_regenerate(model, adapter_name, config);
    config.base_model_name_or_path = options.base_model_name_or_path;
    config.task_type = options.task_type;
    return hf::dump_vera_config(config);
  };
  r.plan_offline_merge = [](const hf::AdapterFiles& files, double scale) -> std::unique_ptr<hf::OfflineMerge> {
    return std::make_unique<VeraOfflineMerge>(files, scale);
  };
  return r;
}

}  // namespace d9d::peft
