#pragma once

// The arithmetic of a VeRA adapter, written once: the layer's forward and
// merge, the method's projections and the offline merge (`d9d-peft merge`)
// all call these.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>

namespace d9d::peft::vera {

/// PEFT's projections for `projection_prng_key`: `A` `[r, max_in]` then `B`
/// `[max_out, r]`, each kaiming-uniform over its fan-in (bound
/// `sqrt(3) · sqrt(2) / sqrt(fan_in)`), drawn in that order from one CPU
/// generator seeded with the key (PEFT's
/// `torch.Generator().manual_seed(key)`; the same Mersenne Twister). float32 on the CPU.
std::pair<at::Tensor, at::Tensor> projections(int64_t r, int64_t max_out, int64_t max_in, int64_t projection_prng_key);

/// `(λ_b ⊙ B[:out, :]) @ (λ_d ⊙ A[:, :in])`, `[out, in]` with `out` the length
/// of `lambda_b`, as PEFT's `get_delta_weight` (half precision on the CPU is
/// computed in float32 and cast back).
at::Tensor delta_weight(const at::Tensor& vera_A, const at::Tensor& vera_B, const at::Tensor& lambda_b,
                        const at::Tensor& lambda_d, int64_t in_features);

/// The adapter's term for input `x` (already dropped out), as PEFT's forward:
/// `λ_b ⊙ linear(λ_d ⊙ linear(x, A[:, :in]), B[:out, :])`.
at::Tensor forward_term(const at::Tensor& x, const at::Tensor& vera_A, const at::Tensor& vera_B,
                        const at::Tensor& lambda_b, const at::Tensor& lambda_d);

/// `weight + delta` in `weight`'s dtype (PEFT's `weight += delta`).
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& delta);

}  // namespace d9d::peft::vera
