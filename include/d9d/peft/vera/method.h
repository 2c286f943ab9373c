#pragma once

#include <d9d/peft/base.h>
#include <d9d/peft/vera/config.h>
#include <d9d/peft/vera/linear.h>

#include <string>

namespace d9d::peft {

/// VeRA (vector-based random matrix adaptation), as Hugging Face PEFT's VeRA on
/// linear layers: `ΔW = (λ_b ⊙ B[:out, :]) (λ_d ⊙ A[:, :in])`, where `A`
/// `[r, max_in]` and `B` `[max_out, r]` are frozen random projections drawn
/// once from `projection_prng_key` and shared by every adapted layer (sized for
/// the largest, sliced for each), and only `λ_b` `[out]` and `λ_d` `[r]` train.
/// Adds adapter `adapter_name`; wraps `d9d::nn::Linear` anywhere and
/// `torch::nn::Linear` inside `Sequential`, `ModuleList` or `ModuleDict` in a
/// `VeraLinearImpl` (all holding the same projection tensors), and emits
/// `x.weight -> x.base.weight` (and bias) renames so a standard checkpoint
/// still loads. `merge` adds `ΔW` to the weights and puts the base layers
/// back. Registered under `peft_type` `"VERA"`, so `hf::load_adapter`,
/// `hf::save_adapter` and `d9d-peft merge` read and write PEFT's VeRA adapters.
class Vera : public PeftMethod<hf::VeraConfig> {
 public:
  /// Validates the config (`ConfigError`).
  explicit Vera(hf::VeraConfig config, std::string adapter_name = kDefaultAdapterName);
  /// From d9d's JSON config (`"kind": "vera"`), adapter "default".
  static Vera from_config(const VeraConfig& config);
  PeftInjectionResult inject(torch::nn::Module& module) override;
  void merge(torch::nn::Module& module) override;
  const std::string& adapter_name() const noexcept { return adapter_name_; }

 private:
  std::string adapter_name_;
};

/// The `hf::VeraConfig` that describes VeRA adapter `adapter_name` of `module`:
/// the layers by full name and the first layer's settings (`PeftError` where
/// layers differ in them: a PEFT VeRA config has no per-module patterns).
hf::VeraConfig vera_config_of(const torch::nn::Module& module, const std::string& adapter_name);

}  // namespace d9d::peft
