#pragma once

#include <d9d/peft/adapter_layer.h>

#include <torch/arg.h>

#include <cstdint>
#include <string>

namespace d9d::peft {

/// How fresh LoRA weights start.
enum class LoRAInit {
  /// A kaiming-uniform(a = sqrt(5)), B zeros (embeddings: A zeros, B normal):
  /// the adapter starts as a no-op.
  Default,
  /// A normal(0, 1/r), B zeros (embeddings as Default). PEFT's "gaussian".
  Gaussian,
  /// Neither is zeroed (PEFT's `init_lora_weights=false`); for tests.
  Random,
  /// PiSSA (PEFT's "pissa", "pissa_niter_<n>"; Linear layers only): from the
  /// base weight's SVD `W = U S V^T`, `B = U_r sqrt(S_r / scale)`,
  /// `A = sqrt(S_r / scale) V_r^T`, and the base weight becomes the residual
  /// `W - scale * B A`, so the layer's output is unchanged. With
  /// `pissa_niter > 0` the SVD is PyTorch's randomized `svd_lowrank` with that
  /// many subspace iterations (it draws from the default generator).
  PiSSA,
  /// OLoRA (PEFT's "olora"; Linear layers only): `W = Q R`, `B = Q[:, :r]`,
  /// `A = R[:r]`, and the base weight becomes `W - scale * B A`.
  OLoRA,
};

/// True for the initialisations that move part of the base weight into the
/// adapter (PiSSA, OLoRA): the base then holds the residual.
inline bool init_changes_base(LoRAInit init) { return init == LoRAInit::PiSSA || init == LoRAInit::OLoRA; }

/// The hyperparameters of one LoRA adapter: what d9d configs (`"params"`),
/// Hugging Face PEFT configs (`hf::LoraConfig::select`) and the layers take.
///
/// ```
/// auto params = d9d::peft::LoRAParameters().r(8).alpha(16).dropout(0.05);
/// d9d::peft::LoRA lora({".*_proj", params});
/// ```
struct LoRAParameters : AdapterOptions {
  /// Rank of the low-rank matrices; >= 1.
  TORCH_ARG(int64_t, r) = 8;
  /// Scale numerator: the adapter's term is multiplied by `alpha / r`; > 0
  /// (d9d's JSON config holds an integer >= 1, as the Python original).
  TORCH_ARG(double, alpha) = 16;
  /// Dropout probability on the adapter's input; in [0, 1).
  TORCH_ARG(double, dropout) = 0.0;
  /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
  TORCH_ARG(bool, use_rslora) = false;
  /// DoRA: a learned magnitude per output row (per embedding dimension).
  TORCH_ARG(bool, use_dora) = false;
  TORCH_ARG(LoRAInit, init) = LoRAInit::Default;
  /// PiSSA only: 0 for the exact SVD ("pissa"), n >= 1 for the randomized one
  /// with n subspace iterations ("pissa_niter_<n>").
  TORCH_ARG(int64_t, pissa_niter) = 0;

 public:  // TORCH_ARG leaves the section private
  /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
  double scale() const;
  /// Throws `ConfigError` naming `path`-relative fields (`params.r: must be >= 1, got 0`).
  void validate(const std::string& path = "") const;
};

/// The initialisation's name in d9d configs (`"params": {"init": ...}`) and,
/// for PiSSA and OLoRA, PEFT's `init_lora_weights`: "default", "gaussian",
/// "random", "pissa", "pissa_niter_<n>", "olora".
std::string lora_init_name(const LoRAParameters& params);
/// Sets `params.init` and `pissa_niter` from such a name; false for another string.
bool parse_lora_init_name(const std::string& name, LoRAParameters& params);

}  // namespace d9d::peft
