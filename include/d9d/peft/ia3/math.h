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

}  // namespace d9d::peft::ia3
