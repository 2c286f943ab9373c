#pragma once

// The arithmetic of a LoKr adapter, written once: the layer's shapes,
// forward and merge and the offline merge (`d9d-peft merge`) all call these.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>

namespace d9d::peft::lokr {

/// PEFT's (and LyCORIS's) `factorization(dimension, factor)`: `{m, n}` with
/// `m * n == dimension`. A `factor > 0` that divides `dimension` gives
/// `{factor, dimension / factor}`; otherwise the pair closest to the square
/// root with `m <= factor` (-1: no bound), smaller first; `factor` 0 or
/// below -1 gives `{1, dimension}`.
std::pair<int64_t, int64_t> factorization(int64_t dimension, int64_t factor = -1);

/// The factor shapes of a LoKr adapter on a linear layer `[out, in]`, as
/// PEFT's `update_layer`: `out = a·b`, `in = c·d` by `factorization`; `w1`
/// is `[a, c]`, `w2` `[b, d]`. `w1` is stored whole unless `decompose_both`
/// and `r < max(a, c) / 2` (then `lokr_w1_a [a, r] @ lokr_w1_b [r, c]`); `w2`
/// is stored whole unless `r < max(b, d) / 2` (then `[b, r] @ [r, d]`).
struct LinearShape {
  int64_t a = 1, b = 1, c = 1, d = 1;
  bool whole_w1 = true;
  bool whole_w2 = true;
};
LinearShape linear_shape(int64_t in_features, int64_t out_features, int64_t r, bool decompose_both,
                         int64_t decompose_factor);

/// `kron(w1, w2) * scale`, `[a·b, c·d]`, as PEFT's `make_kron` (in the factors' dtype).
at::Tensor delta_weight(const at::Tensor& w1, const at::Tensor& w2, double scale);
/// PEFT's rank dropout of a delta: each row kept where one `at::rand(out)`
/// draw from the default generator (PEFT's `torch.rand`) exceeds
/// `rank_dropout`; with `scale`, the kept rows are divided by the kept fraction.
at::Tensor rank_dropout(const at::Tensor& delta, double rank_dropout, bool scale);
/// `weight + delta` in `weight`'s dtype (PEFT's `weight.data += delta`).
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& delta);
/// `weight - delta` in `weight`'s dtype.
at::Tensor unmerged_weight(const at::Tensor& weight, const at::Tensor& delta);

}  // namespace d9d::peft::lokr
