#pragma once

#include <d9d/peft/base.h>
#include <d9d/peft/loha/config.h>
#include <d9d/peft/loha/conv2d.h>
#include <d9d/peft/loha/linear.h>

#include <string>

namespace d9d::peft {

/// LoHa (low-rank Hadamard product, from LyCORIS), as Hugging Face PEFT's
/// LoHa on linear and Conv2d layers: `ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) ·
/// alpha / r`, rank at most r² with 4·r·(in + out)/2 parameters. Adds adapter
/// `adapter_name`; wraps `d9d::nn::Linear` anywhere and `torch::nn::Linear`
/// inside `Sequential`, `ModuleList` or `ModuleDict` in a `LoHaLinearImpl`,
/// `d9d::nn::Conv2d` (padding mode zeros) in a `LoHaConv2dImpl`, and emits `x.weight -> x.base.weight` (and bias) renames so a standard
/// checkpoint still loads. `merge` adds `ΔW` to the weights and puts the base
/// layers back. Registered under `peft_type` `"LOHA"`, so `hf::load_adapter`,
/// `hf::save_adapter` and `d9d-peft merge` read and write PEFT's LoHa adapters.
class LoHa : public PeftMethod<hf::LoHaConfig> {
 public:
  /// Validates the config (`ConfigError`).
  explicit LoHa(hf::LoHaConfig config, std::string adapter_name = kDefaultAdapterName);
  /// From d9d's JSON config (`"kind": "loha"`), adapter "default".
  static LoHa from_config(const LoHaConfig& config);
  PeftInjectionResult inject(torch::nn::Module& module) override;
  void merge(torch::nn::Module& module) override;
  const std::string& adapter_name() const noexcept { return adapter_name_; }

 private:
  std::string adapter_name_;
};

/// The `hf::LoHaConfig` that describes LoHa adapter `adapter_name` of
/// `module`: the layers by full name, the first layer's r and alpha, the
/// others' where they differ as `rank_pattern`/`alpha_pattern`.
hf::LoHaConfig loha_config_of(const torch::nn::Module& module, const std::string& adapter_name);

}  // namespace d9d::peft
