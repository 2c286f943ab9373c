#pragma once

// The arithmetic of merging a LoRA adapter into a grouped expert weight
// (`d9d::nn::GroupedLinear`), written once for every caller.

#include <ATen/core/Tensor.h>

namespace d9d::peft::lora {

/// `scale * bmm(A, B)`: `[G, in, out]` from A `[G, in, r]` and B `[G, r, out]`,
/// computed in float32 (float64 for a float64 weight) whatever the adapter's dtype.
at::Tensor grouped_delta_weight(const at::Tensor& a, const at::Tensor& b, double scale, const at::Tensor& weight);

/// `weight += scale * bmm(A, B)` in place: one `baddbmm_` where the weight is
/// float32/float64, otherwise the sum formed in float32 and copied back.
void grouped_merge_in_place(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale);

/// `weight -= scale * bmm(A, B)` in place, as `grouped_merge_in_place`.
void grouped_unmerge_in_place(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale);

}  // namespace d9d::peft::lora
