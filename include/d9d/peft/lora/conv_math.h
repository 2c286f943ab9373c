#pragma once

// The arithmetic of merging a LoRA adapter into a Conv2d weight, written
// once: the in-model merge (`LoRAConv2dImpl::merge_adapter`) and the offline
// checkpoint merge (`d9d-peft merge`) both call these. Shapes are PEFT's:
// weight `[out, in, kh, kw]`, A `[r, in, kh, kw]`, B `[out, r, 1, 1]`, DoRA's
// magnitude `[1, out, 1, 1]`. Everything is computed in float32 (float64 for
// a float64 weight) and returned in the weight's dtype.

#include <ATen/core/Tensor.h>

namespace d9d::peft::lora {

/// PEFT's `get_delta_weight` for a conv layer, times `scale`:
/// `(B[:, :, 0, 0] @ A[:, :, 0, 0])[..., None, None]` for a 1x1 kernel,
/// otherwise `conv2d(A^T, B)^T` (axes 0 and 1 swapped), in the compute type.
at::Tensor conv_delta_weight(const at::Tensor& a, const at::Tensor& b, double scale, const at::Tensor& weight);

/// DoRA's norm as PEFT's forward (and the magnitude's initialisation)
/// computes it: `||W + scale * reshape(B_flat @ A_flat)||` over every axis
/// but the output one, as `[1, out, 1, 1]`.
at::Tensor conv_dora_norm(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale);

/// `W + delta`, or with a DoRA `magnitude` (defined) `m / ||W + delta|| * (W + delta)`
/// per output channel, the norm (`[out]`) written to `norm_out` when given (for unmerging).
at::Tensor conv_merged_weight(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale,
                              const at::Tensor& magnitude = {}, at::Tensor* norm_out = nullptr);

/// The inverse of `conv_merged_weight`, given the DoRA norm the merge used
/// (undefined without DoRA).
at::Tensor conv_unmerged_weight(const at::Tensor& merged, const at::Tensor& a, const at::Tensor& b, double scale,
                                const at::Tensor& magnitude = {}, const at::Tensor& norm = {});

}  // namespace d9d::peft::lora
