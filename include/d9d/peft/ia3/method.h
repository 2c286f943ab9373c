#pragma once

#include <d9d/peft/base.h>
#include <d9d/peft/ia3/config.h>
#include <d9d/peft/ia3/conv2d.h>
#include <d9d/peft/ia3/linear.h>

#include <string>

namespace d9d::peft {

/// (IA)³, as Hugging Face PEFT's IA3: a learned vector per selected linear
/// or convolution layer that rescales its output, or its input on
/// feed-forward layers. Adds adapter `adapter_name`; wraps `d9d::nn::Linear`
/// anywhere and `torch::nn::Linear` inside `Sequential`, `ModuleList` or
/// `ModuleDict` in an `IA3LinearImpl`, `d9d::nn::Conv2d` (any groups,
/// dilation, padding mode) in an `IA3Conv2dImpl`, and emits `x.weight -> x.base.weight` (and bias) renames so
/// a standard checkpoint still loads. `merge` folds the vectors into the
/// weights (and biases) and puts the base layers back. Registered under
/// `peft_type` `"IA3"`, so `hf::load_adapter`, `hf::save_adapter` and
/// `d9d-peft merge` read and write PEFT's IA3 adapters.
class IA3 : public PeftMethod<hf::IA3Config> {
 public:
  /// Validates the config (`ConfigError`).
  explicit IA3(hf::IA3Config config, std::string adapter_name = kDefaultAdapterName);
  /// From d9d's JSON config (`"kind": "ia3"`), adapter "default".
  static IA3 from_config(const IA3Config& config);
  PeftInjectionResult inject(torch::nn::Module& module) override;
  void merge(torch::nn::Module& module) override;
  const std::string& adapter_name() const noexcept { return adapter_name_; }

 private:
  std::string adapter_name_;
};

/// The `hf::IA3Config` that describes IA3 adapter `adapter_name` of `module`.
hf::IA3Config ia3_config_of(const torch::nn::Module& module, const std::string& adapter_name);

}  // namespace d9d::peft
