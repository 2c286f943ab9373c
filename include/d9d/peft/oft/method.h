#pragma once

#include <d9d/peft/base.h>
#include <d9d/peft/oft/config.h>
#include <d9d/peft/oft/conv2d.h>
#include <d9d/peft/oft/linear.h>

#include <string>

namespace d9d::peft {

/// OFT (orthogonal fine-tuning), as Hugging Face PEFT 0.21's OFT on linear
/// and Conv2d layers: the input is rotated by a block-diagonal orthogonal `R`
/// (each block the Cayley transform of a trained skew-symmetric matrix)
/// before the frozen layer, `y = W (x R) + b`. Adds adapter `adapter_name`;
/// wraps `d9d::nn::Linear` anywhere and `torch::nn::Linear` inside
/// `Sequential`, `ModuleList` or `ModuleDict` in an `OFTLinearImpl`,
/// `d9d::nn::Conv2d` (groups 1, undilated, square kernel) in an
/// `OFTConv2dImpl` (filters rotated: see there for kernels larger than 1×1),
/// and emits
/// `x.weight -> x.base.weight` (and bias) renames so a standard checkpoint
/// still loads. `merge` writes `W Rᵀ` and puts the base layers back.
/// Registered under `peft_type` `"OFT"`, so `hf::load_adapter`,
/// `hf::save_adapter` and `d9d-peft merge` read and write PEFT's OFT adapters.
class OFT : public PeftMethod<hf::OFTConfig> {
 public:
  /// Validates the config (`ConfigError`).
  explicit OFT(hf::OFTConfig config, std::string adapter_name = kDefaultAdapterName);
  /// From d9d's JSON config (`"kind": "oft"`), adapter "default".
  static OFT from_config(const OFTConfig& config);
  PeftInjectionResult inject(torch::nn::Module& module) override;
  void merge(torch::nn::Module& module) override;
  const std::string& adapter_name() const noexcept { return adapter_name_; }

 private:
  std::string adapter_name_;
};

/// The `hf::OFTConfig` that describes OFT adapter `adapter_name` of `module`:
/// the layers by full name and their shared options (PEFT's OFT config has no
/// per-module patterns, so layers that differ are a `PeftError`).
hf::OFTConfig oft_config_of(const torch::nn::Module& module, const std::string& adapter_name);

}  // namespace d9d::peft
