#pragma once
// LoRA initialisations that start from the base weight (PiSSA, OLoRA): the
// factors and the residual, as Hugging Face PEFT's `pissa_init` / `olora_init`
// compute them.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>

namespace d9d::peft::lora {

/// PiSSA's factors of `weight` `[out, in]` at rank `r` (float32):
/// `W = U S V^T`, `A = sqrt(S_r / scale) V_r^T` `[r, in]`,
/// `B = U_r sqrt(S_r / scale)` `[out, r]`, so `scale * B A` is W's best rank-r
/// part. `niter == 0`: the exact SVD (`torch.linalg.svd`); `niter >= 1`:
/// PyTorch's randomized `svd_lowrank(W, r, niter)` (Halko et al.'s
/// algorithm 5, drawing `randn(in, r)` from the default generator).
std::pair<at::Tensor, at::Tensor> pissa_factors(const at::Tensor& weight, int64_t r, double scale, int64_t niter);

/// OLoRA's factors of `weight` `[out, in]` (float32): `W = Q R` (reduced QR),
/// `A = R[:r]` `[r, in]`, `B = Q[:, :r]` `[out, r]`.
std::pair<at::Tensor, at::Tensor> olora_factors(const at::Tensor& weight, int64_t r);

/// PyTorch's `torch.svd_lowrank(a, q, niter)` for a 2-D `a`: `(U, S, V)`
/// with `a ~ U diag(S) V^T`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_lowrank(const at::Tensor& a, int64_t q, int64_t niter);

}  // namespace d9d::peft::lora
