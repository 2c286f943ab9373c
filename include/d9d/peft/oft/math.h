#pragma once

// The arithmetic of an OFT adapter, written once, as PEFT 0.21's
// OFTRotationModule and oft.Linear: the layer's forward and merge and the
// offline merge (`d9d-peft merge`) all call these.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace d9d::peft::oft {

/// The blocks of one layer: how many, and their side.
struct Blocks {
  int64_t r = 0;
  int64_t block_size = 0;
};

/// PEFT's adjust_oft_parameters: `value` if it divides `in_features`, else the
/// nearest divisor (the lower one on a tie; `in_features` itself when `value`
/// exceeds it).
int64_t adjust(int64_t in_features, int64_t value);
/// The blocks PEFT builds for a layer with `in_features` inputs from a config's
/// `r` and `oft_block_size` (exactly one non-zero), adjusted as PEFT adjusts.
Blocks resolve(int64_t in_features, int64_t r, int64_t oft_block_size);
/// The shape of the `oft_R.weight` parameter: `[block_share ? 1 : r, b(b-1)/2]`.
std::vector<int64_t> weight_shape(const Blocks& blocks, bool block_share);

/// `[n, b(b-1)/2]` upper-triangle vectors (row-major, diagonal excluded) to
/// `[n, b, b]` skew-symmetric matrices `Q = U - Uᵀ`.
at::Tensor skew(const at::Tensor& vec, int64_t block_size);
/// PEFT's `_cayley_batch`: with `neumann`, `I + 2Q + 2Q² + ... + Q^(k-1)`
/// (its exact loop over `terms` = k); else `(I - Q)(I + Q)⁻¹` by a solve.
at::Tensor cayley(const at::Tensor& vec, int64_t block_size, bool neumann, int64_t terms);
/// COFT's `_project_batch`: each block's `Q` scaled back into the ball of
/// Frobenius radius `eps / sqrt(n)`; returns the vectors.
at::Tensor project(const at::Tensor& vec, int64_t block_size, double eps);
/// The `[rank, b, b]` blocks, the one shared block repeated with `block_share`.
at::Tensor expand_blocks(const at::Tensor& blocks, int64_t rank);
/// `x` rotated block by block: `x[..., i·b:(i+1)·b] @ R_i` (PEFT's einsum).
at::Tensor rotate(const at::Tensor& x, const at::Tensor& blocks);
/// The block-diagonal `[in, in]` rotation (PEFT's `get_delta_weight`).
at::Tensor block_diagonal(const at::Tensor& blocks);
/// `(R @ Wᵀ)ᵀ` in `weight`'s dtype and shape, on its device, with `W` the
/// weight seen as `[out, features]` (a Conv2d's `[out, in, k, k]` as PEFT's
/// `weight.view(out, in·k·k)`): the weight whose linear layer computes
/// `base(x · R)`, and whose Conv2d has each filter rotated.
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& rotation);
/// `(R⁻¹ @ Wᵀ)ᵀ` the same way (the inverse taken in float32, as PEFT's unmerge).
at::Tensor unmerged_weight(const at::Tensor& weight, const at::Tensor& rotation);

}  // namespace d9d::peft::oft
