// The OFT method: injection, merge, the offline merge and its registration
// under PEFT's peft_type "OFT".
#include <d9d/peft/adapters.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/merge.h>
#include <d9d/peft/inject.h>
#include <d9d/peft/linear_targeting.h>
#include <d9d/peft/oft/math.h>
#include <d9d/peft/oft/method.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "../builtin_methods.h"
#include "../hf/config_rules.h"
#include "../non_finite.h"

#include <map>

namespace d9d::peft {

OFT::OFT(hf::OFTConfig config, std::string adapter_name)
    : PeftMethod(std::move(config)), adapter_name_(std::move(adapter_name)) {
  validate(config_);
  validate_adapter_name(adapter_name_);
}

OFT OFT::from_config(const OFTConfig& config) {
  validate(config);
  return OFT(to_peft_config(config));
}

PeftInjectionResult OFT::inject(torch::nn::Module& module) {
  AdapterTargeting t = with_conv2d<OFTConv2dImpl, OFTParameters>(
      linear_targeting<OFTLinearImpl, OFTParameters>("OFT", "OFT", adapter_name_, config_.target_modules,
                                                     [this](const std::string& name) { return config_.select(name); }),
      &oft_conv2d_refusal);
  // On kernels larger than 1x1 this library computes PEFT's merged model,
  // which PEFT 0.21's own unmerged forward does not: said once per layer.
  t.check = [check = std::move(t.check)](const std::string& name, const torch::nn::Module& m,
                                         const AdapterOptions& o) {
    check(name, m, o);
    const auto* conv = m.as<d9d::nn::Conv2dImpl>();
    if (conv && (*conv->options.kernel_size())[0] > 1) {
      TORCH_WARN("OFT: '", name, "' is a Conv2d with a ", (*conv->options.kernel_size())[0], "x",
                 (*conv->options.kernel_size())[1],
                 " kernel; this layer computes the filters rotated, conv(x, W·Rᵀ), which is PEFT's merge_and_unload "
                 "model. PEFT 0.21's unmerged forward for kernels larger than 1x1 rotates overlapping input patches "
                 "and sums them back, so its unmerged outputs differ from these (see docs/conv.md)");
    }
  };
  return inject_adapters(module, t);
}

void OFT::merge(torch::nn::Module& module) {
  merge_adapter(
      module, [this](const std::string& name) { return config_.select(name).has_value(); }, adapter_name_);
}

hf::OFTConfig oft_config_of(const torch::nn::Module& module, const std::string& adapter_name) {
  hf::OFTConfig config;
  std::string first;
  for (const auto& entry : adapter_layers(module)) {
    if (!entry.layer->has_adapter(adapter_name)) continue;
    const auto* layer = dynamic_cast<const OFTLayerImpl*>(entry.layer);
    if (!layer) {
      throw PeftError(fmt::format("save_adapter: '{}' holds adapter \"{}\" of another method ({})", entry.name,
                                  adapter_name, entry.layer->peft_type()));
    }
    const OFTParameters& o = layer->adapter(adapter_name).options();
    hf::OFTConfig mine;
    mine.r = o.r();
    mine.oft_block_size = o.oft_block_size();
    mine.module_dropout = o.module_dropout();
    mine.coft = o.coft();
    mine.eps = o.eps();
    mine.block_share = o.block_share();
    mine.use_cayley_neumann = o.use_cayley_neumann();
    mine.num_cayley_neumann_terms = o.num_cayley_neumann_terms();
    mine.init_weights = o.init_weights();
    if (first.empty()) {
      first = entry.name;
      config = mine;
    } else if (!(mine.r == config.r && mine.oft_block_size == config.oft_block_size &&
                 mine.module_dropout == config.module_dropout && mine.coft == config.coft && mine.eps == config.eps &&
                 mine.block_share == config.block_share && mine.use_cayley_neumann == config.use_cayley_neumann &&
                 mine.num_cayley_neumann_terms == config.num_cayley_neumann_terms)) {
      throw PeftError(fmt::format("save_adapter: '{}' has other OFT options than '{}', which a PEFT OFT config cannot "
                                  "express per module (it has no rank_pattern); save them as separate adapters",
                                  entry.name, first));
    }
    config.target_modules.names.push_back(entry.name);
  }
  if (first.empty()) throw PeftError(fmt::format("save_adapter: no layer holds adapter \"{}\"", adapter_name));
  return config;
}

namespace {

const std::string kWeightSuffix = ".oft_R.weight";

/// OFT's offline merge: `<path>.oft_R.weight` builds `R`, and `<path>.weight` becomes `(R @ Wᵀ)ᵀ`.
class OFTOfflineMerge : public hf::OfflineMerge {
 public:
  OFTOfflineMerge(const hf::AdapterFiles& files, double scale) : source_(files.weights_path) {
    if (scale != 1.0) {
      throw PeftError(fmt::format("{}: an OFT adapter rotates the weight and cannot be scaled (got --scale {}); merge "
                                  "it with scale 1",
                                  source_, scale));
    }
    config_ = hf::parse_oft_config(files.config, files.config_path);
    for (const auto& [key, tensor] : files.tensors) {
      const std::string path = key.rfind(hf::kPeftKeyPrefix, 0) == 0 ? key.substr(hf::kPeftKeyPrefix.size()) : key;
      if (!hf::detail::ends_with(path, kWeightSuffix) || path.size() == kWeightSuffix.size()) {
        throw PeftError(fmt::format("{}: '{}' is not an OFT weight (expected keys ending in {})",
                                    source_, key, kWeightSuffix.substr(1)));
      }
      const std::string module = path.substr(0, path.size() - kWeightSuffix.size());
      if (!config_.select(module)) {
        throw PeftError(fmt::format("{}: the adapter holds '{}' but adapter_config.json does not target '{}'",
                                    source_, key, module));
      }
      modules_[module] = {key, tensor};
    }
    if (modules_.empty()) throw PeftError(fmt::format("{}: the adapter holds no weights", source_));
  }

  std::vector<std::string> target_keys(const model_state::KeySet&) const override {
    std::vector<std::string> keys;
    for (const auto& entry : modules_) keys.push_back(entry.first + ".weight");
    return keys;
  }

  void check(const std::string& key, const at::Tensor& base, bool allow_non_finite) const override {
    const auto& [adapter_key, weight] = module_of(key);
    if (!at::isFloatingType(base.scalar_type())) {
      throw PeftError(fmt::format("'{}' has dtype {} in the base checkpoint; OFT merges into floating-point weights only",
                                  key, c10::toString(base.scalar_type())));
    }
    if (base.dim() != 2 && !(base.dim() == 4 && base.size(2) == base.size(3))) {
      throw PeftError(fmt::format("'{}' has shape [{}]; OFT merges into linear weights [out, in] and Conv2d weights "
                                  "[out, in, k, k]",
                                  key, fmt::join(base.sizes(), ", ")));
    }
    const int64_t features = base.numel() / base.size(0);
    const oft::Blocks blocks = oft::resolve(features, config_.r, config_.oft_block_size);
    const auto expected = oft::weight_shape(blocks, config_.block_share);
    if (weight.sizes() != at::IntArrayRef(expected)) {
      throw PeftError(fmt::format("'{}' has shape [{}] but '{}' [{}] needs [{}] for its {} rotated features (r = {}, "
                                  "oft_block_size = {}{}; wrong base model?)",
                                  adapter_key, fmt::join(weight.sizes(), ", "), key, fmt::join(base.sizes(), ", "),
                                  fmt::join(expected, ", "), features, blocks.r, blocks.block_size,
                                  config_.block_share ? ", block_share" : ""));
    }
    if (!allow_non_finite && detail::count_non_finite(weight) > 0) {
      throw PeftError(fmt::format("{}: '{}' holds NaN or Inf; merging it would write them into '{}'. Nothing was "
                                  "written. Fix or retrain the adapter, or merge anyway with --allow-non-finite",
                                  source_, adapter_key, key));
    }
  }

  at::Tensor merge(const std::string& key, const at::Tensor& base, bool allow_non_finite) const override {
    const at::Tensor& weight = module_of(key).second;
    const OFTParameters options = config_.parameters();
    OFTAdapterImpl adapter(base.numel() / base.size(0), options, weight.options());
    {
      torch::NoGradGuard no_grad;
      adapter.oft_R->weight.copy_(weight);
    }
    const at::Tensor out = oft::merged_weight(base, adapter.rotation());
    if (!allow_non_finite && detail::count_non_finite(out) > 0) {
      throw PeftError(fmt::format("merging into '{}' gives NaN or Inf values (the product overflows {}). Nothing was "
                                  "written; merge anyway with --allow-non-finite",
                                  key, c10::toString(out.scalar_type())));
    }
    return out;
  }

 private:
  const std::pair<std::string, at::Tensor>& module_of(const std::string& key) const {
    return modules_.at(key.substr(0, key.rfind('.')));
  }
  std::string source_;
  hf::OFTConfig config_;
  std::map<std::string, std::pair<std::string, at::Tensor>> modules_;
};

}  // namespace

PeftMethodRegistration oft_registration() {
  PeftMethodRegistration r = d9d_config_registration<OFTConfig, OFT>(&parse_oft_config_json);
  r.peft_type = "OFT";
  r.load_hf_config = [](const nlohmann::json& j, const std::string& source,
                        const std::string& adapter_name) -> std::unique_ptr<PeftMethodBase> {
    return std::make_unique<OFT>(hf::parse_oft_config(j, source), adapter_name);
  };
  r.write_hf_config = [](const torch::nn::Module& model, const std::string& adapter_name,
                         const hf::SaveAdapterOptions& options) {
    hf::OFTConfig config = oft_config_of(model, adapter_name);
    config.base_model_name_or_path = options.base_model_name_or_path;
    config.task_type = options.task_type;
    return hf::dump_oft_config(config);
  };
  r.plan_offline_merge = [](const hf::AdapterFiles& files, double scale) -> std::unique_ptr<hf::OfflineMerge> {
    return std::make_unique<OFTOfflineMerge>(files, scale);
  };
  return r;
}

}  // namespace d9d::peft
