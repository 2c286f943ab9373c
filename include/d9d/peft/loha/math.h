#pragma once

// The arithmetic of a LoHa adapter, written once: the layer's forward and
// merge and the offline merge (`d9d-peft merge`) all call these (the merge's
// sum itself is `added_delta`, delta_layer.h).

#include <ATen/core/Tensor.h>

namespace d9d::peft::loha {

/// `(w1_a @ w1_b) * (w2_a @ w2_b) * scale`, `[out, in]`, as PEFT's `make_weight`
/// (in the factors' dtype).
at::Tensor delta_weight(const at::Tensor& w1_a, const at::Tensor& w1_b, const at::Tensor& w2_a,
                        const at::Tensor& w2_b, double scale);
/// PEFT's `make_weight_cp`: `einsum("ijkl,jr,ip->prkl", t1, w1_b, w1_a) *
/// einsum(same, t2, w2_b, w2_a) * scale`, `[out, in, kh, kw]` from `t1`, `t2`
/// `[r, r, kh, kw]`, `w1_a`, `w2_a` `[r, out]`, `w1_b`, `w2_b` `[r, in]`.
at::Tensor delta_weight_cp(const at::Tensor& t1, const at::Tensor& w1_a, const at::Tensor& w1_b, const at::Tensor& t2,
                           const at::Tensor& w2_a, const at::Tensor& w2_b, double scale);
/// PEFT's rank dropout of a delta: each output row (dimension 0) kept with probability
/// `1 - rank_dropout` (one `at::rand(out)` draw from the default generator,
/// as PEFT's `torch.rand`), the kept rows divided by the kept fraction.
at::Tensor rank_dropout(const at::Tensor& delta, double rank_dropout);

}  // namespace d9d::peft::loha
