#pragma once

#include <d9d/peft/adapter_layer.h>

#include <ATen/core/Tensor.h>
#include <torch/arg.h>

#include <cstdint>
#include <string>

namespace d9d::peft {

/// The options of one VeRA adapter (vector-based random matrix adaptation,
/// Hugging Face PEFT's VeRA): `ΔW = (λ_b ⊙ B[:out, :]) (λ_d ⊙ A[:, :in])` with
/// `A` `[r, max_in]` and `B` `[max_out, r]` frozen random projections shared by
/// every layer of the adapter, and `λ_b` `[out]`, `λ_d` `[r]` trained.
///
/// ```
/// auto options = d9d::peft::VeraParameters().r(64).d_initial(0.1).projection_prng_key(0);
/// ```
struct VeraParameters : AdapterOptions {
  /// The rank: rows of `A`, columns of `B`, length of `λ_d` (PEFT's `r`).
  TORCH_ARG(int64_t, r) = 256;
  /// The seed of the CPU generator the projections are drawn from
  /// (kaiming-uniform, `A` then `B`), as PEFT's `projection_prng_key`.
  TORCH_ARG(int64_t, projection_prng_key) = 0;
  /// Whether adapter files hold the projections (PEFT's `save_projection`);
  /// without them they are drawn again from `projection_prng_key` on loading.
  TORCH_ARG(bool, save_projection) = true;
  /// In training, dropout on the adapter's input (PEFT's `vera_dropout`).
  TORCH_ARG(double, vera_dropout) = 0.0;
  /// The value `λ_d` starts at (PEFT's `d_initial`); `λ_b` starts at zero.
  TORCH_ARG(double, d_initial) = 0.1;
  /// PEFT's `init_weights`: true starts `λ_b` at zeros and `λ_d` at
  /// `d_initial` (a no-op adapter); false leaves `λ_b` ones and `λ_d` drawn
  /// from a normal distribution, for tests.
  TORCH_ARG(bool, init_weights) = true;
  /// The adapter's shared projections `A` `[r, max_in]` and `B` `[max_out, r]`,
  /// the same tensors for every layer (the `VeRA` method draws them once, sized
  /// for the largest layer it adapts). Undefined: a layer draws its own from
  /// `projection_prng_key`, sized for itself.
  TORCH_ARG(at::Tensor, vera_A);
  TORCH_ARG(at::Tensor, vera_B);

  // TORCH_ARG leaves the struct in a private section.
 public:
  /// Throws `ConfigError` naming `path`-relative fields.
  void validate(const std::string& path = "") const;
};

}  // namespace d9d::peft
