#pragma once

// The arithmetic of merging an (IA)³ vector into a linear layer, written once:
// the in-model merge (`IA3LinearImpl::merge_adapter`) and the offline merge
// (`d9d-peft merge`) both call these.

#include <ATen/core/Tensor.h>

namespace d9d::peft::ia3 {

/// `weight * l` with `l` `[out, 1]` (rows) or, for a feed-forward layer,
/// `[1, in]` (columns), in `weight`'s dtype, as PEFT's `merge`.
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& l);
/// `bias * l` for an output-scaling layer (`l` reshaped to the bias).
at::Tensor merged_bias(const at::Tensor& bias, const at::Tensor& l);
/// The inverses, dividing by `l + 1e-8` as PEFT's `unmerge`.
at::Tensor unmerged_weight(const at::Tensor& weight, const at::Tensor& l);
at::Tensor unmerged_bias(const at::Tensor& bias, const at::Tensor& l);

/// What a Conv2d weight `[out, in / groups, kh, kw]` is multiplied by to merge
/// `l` `[1, F, 1, 1]`, as PEFT's `_get_ia3_scaling_for_weight`: `l` laid
/// along the output channels (`[out, 1, 1, 1]`), or for a feed-forward layer
/// (`F` = in) along the input channels, each group's slice of `l` repeated
/// for the group's output channels (`[out, in / groups, 1, 1]`).
at::Tensor conv_weight_scale(const at::Tensor& l, bool feedforward, int64_t groups, int64_t out_channels);

}  // namespace d9d::peft::ia3
