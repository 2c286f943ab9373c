#pragma once

// The arithmetic of a LoKr adapter, written once: the layer's shapes,
// forward and merge and the offline merge (`d9d-peft merge`) all call these
// (the merge's sum itself is `added_delta`, delta_layer.h).

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

/// The factor shapes of a LoKr adapter, as PEFT's `update_layer`. On a
/// linear layer `[out, in]`, `out = a·b`, `in = c·d` by `factorization`;
/// `w1` is `[a, c]`, `w2` `[b, d]`. `w1` is stored whole unless
/// `decompose_both` and `r < max(a, c) / 2` (then `lokr_w1_a [a, r] @
/// lokr_w1_b [r, c]`); `w2` is stored whole unless `r < max(b, d) / 2` (then
/// `[b, r] @ [r, d]`).
///
/// On a Conv2d `[out, in/groups, kh, kw]`, the same with `in/groups`, and
/// `w2` carries the kernel: whole `lokr_w2 [b, d, kh, kw]`; factored flat
/// `lokr_w2_a [b, r] @ lokr_w2_b [r, d·kh·kw]`; or factored in PEFT's CP form
/// (`use_effective_conv2d` and a kernel larger than 1×1) `lokr_t2
/// [r, r, kh, kw]`, `lokr_w2_a [r, b]`, `lokr_w2_b [r, d]`.
struct FactorShape {
  int64_t a = 1, b = 1, c = 1, d = 1;
  /// A Conv2d's kernel; 0 on a linear layer.
  int64_t kh = 0, kw = 0;
  bool whole_w1 = true;
  bool whole_w2 = true;
  /// `w2` factored in the CP form (`lokr_t2`).
  bool cp = false;
};
FactorShape linear_shape(int64_t in_features, int64_t out_features, int64_t r, bool decompose_both,
                         int64_t decompose_factor);
/// `in_per_group` is the weight's dimension 1 (`in_channels / groups`).
FactorShape conv_shape(int64_t in_per_group, int64_t out_channels, int64_t kh, int64_t kw, int64_t r,
                       bool decompose_both, int64_t decompose_factor, bool use_effective_conv2d);

/// PEFT's `make_weight_cp`: `einsum("ijkl,ip,jr->prkl", t, wa, wb)`, `[b, d, kh, kw]`
/// from `t` `[r, r, kh, kw]`, `wa` `[r, b]`, `wb` `[r, d]`.
at::Tensor cp_weight(const at::Tensor& t, const at::Tensor& wa, const at::Tensor& wb);
/// `kron(w1, w2) * scale`, `[a·b, c·d]` (or `[a·b, c·d, kh, kw]` for a 4-D
/// `w2`, `w1` taken as `[a, c, 1, 1]`), as PEFT's `make_kron` (in the factors' dtype).
at::Tensor delta_weight(const at::Tensor& w1, const at::Tensor& w2, double scale);
/// PEFT's rank dropout of a delta: each output row (dimension 0) kept where one `at::rand(out)`
/// draw from the default generator (PEFT's `torch.rand`) exceeds
/// `rank_dropout`; with `scale`, the kept rows are divided by the kept fraction.
at::Tensor rank_dropout(const at::Tensor& delta, double rank_dropout, bool scale);
}  // namespace d9d::peft::lokr
