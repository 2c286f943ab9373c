#pragma once

#include <d9d/peft/base.h>
#include <d9d/peft/lokr/config.h>
#include <d9d/peft/lokr/conv2d.h>
#include <d9d/peft/lokr/linear.h>

#include <string>

namespace d9d::peft {

/// LoKr (low-rank Kronecker product, from LyCORIS), as Hugging Face PEFT's
/// LoKr on linear and Conv2d layers: `ΔW = kron(w1, w2) · alpha / r` with
/// `w1` `[a, c]`, `w2` `[b, d]` (`out = a·b`, `in = c·d`; a Conv2d's `w2`
/// carries the kernel), each whole or a rank-r product by PEFT's rules
/// (`lokr::FactorShape`). Adds adapter `adapter_name`; wraps
/// `d9d::nn::Linear` anywhere and `torch::nn::Linear` inside `Sequential`,
/// `ModuleList` or `ModuleDict` in a `LoKrLinearImpl`, `d9d::nn::Conv2d`
/// (padding mode zeros) in a `LoKrConv2dImpl`, and emits `x.weight -> x.base.weight` (and bias) renames so a standard
/// checkpoint still loads. `merge` adds `ΔW` to the weights and puts the base
/// layers back. Registered under `peft_type` `"LOKR"`, so `hf::load_adapter`,
/// `hf::save_adapter` and `d9d-peft merge` read and write PEFT's LoKr adapters.
class LoKr : public PeftMethod<hf::LoKrConfig> {
 public:
  /// Validates the config (`ConfigError`).
  explicit LoKr(hf::LoKrConfig config, std::string adapter_name = kDefaultAdapterName);
  /// From d9d's JSON config (`"kind": "lokr"`), adapter "default".
  static LoKr from_config(const LoKrConfig& config);
  PeftInjectionResult inject(torch::nn::Module& module) override;
  void merge(torch::nn::Module& module) override;
  const std::string& adapter_name() const noexcept { return adapter_name_; }

 private:
  std::string adapter_name_;
};

/// The `hf::LoKrConfig` that describes LoKr adapter `adapter_name` of
/// `module`: the layers by full name, the first layer's r and alpha, the
/// others' where they differ as `rank_pattern`/`alpha_pattern`. The options
/// a PEFT config holds once for all layers (dropouts, `decompose_both`,
/// `decompose_factor`) must agree across layers (`PeftError` otherwise).
hf::LoKrConfig lokr_config_of(const torch::nn::Module& module, const std::string& adapter_name);

}  // namespace d9d::peft
