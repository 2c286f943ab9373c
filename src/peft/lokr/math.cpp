#include <d9d/peft/lokr/math.h>

#include <ATen/Functions.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace d9d::peft::lokr {

std::pair<int64_t, int64_t> factorization(int64_t dimension, int64_t factor) {
  // LyCORIS's algorithm as PEFT copies it, step for step (its output for
  // factors that do not divide the dimension is part of the file format).
  if (factor > 0 && dimension % factor == 0) return {factor, dimension / factor};
  if (factor == -1) factor = dimension;
  int64_t m = 1, n = dimension;
  const int64_t length = m + n;
  while (m < n) {
    int64_t new_m = m + 1;
    while (dimension % new_m != 0) ++new_m;
    const int64_t new_n = dimension / new_m;
    if (new_m + new_n > length || new_m > factor) break;
    m = new_m;
    n = new_n;
  }
  if (m > n) std::swap(m, n);
  return {m, n};
}

FactorShape linear_shape(int64_t in_features, int64_t out_features, int64_t r, bool decompose_both,
                         int64_t decompose_factor) {
  FactorShape s;
  std::tie(s.a, s.b) = factorization(out_features, decompose_factor);
  std::tie(s.c, s.d) = factorization(in_features, decompose_factor);
  // PEFT compares r with max(...) / 2 in floating point: r < 2.5 for 5.
  auto below_half = [r](int64_t x, int64_t y) { return 2 * r < std::max(x, y); };
  s.whole_w1 = !(decompose_both && below_half(s.a, s.c));
  s.whole_w2 = !below_half(s.b, s.d);
  return s;
}

FactorShape conv_shape(int64_t in_per_group, int64_t out_channels, int64_t kh, int64_t kw, int64_t r,
                       bool decompose_both, int64_t decompose_factor, bool use_effective_conv2d) {
  FactorShape s = linear_shape(in_per_group, out_channels, r, decompose_both, decompose_factor);
  s.kh = kh;
  s.kw = kw;
  // PEFT keeps 1x1 kernels flat, and the CP core only replaces a factored w2.
  s.cp = use_effective_conv2d && !(kh == 1 && kw == 1) && !s.whole_w2;
  return s;
}

at::Tensor cp_weight(const at::Tensor& t, const at::Tensor& wa, const at::Tensor& wb) {
  return at::einsum("ijkl,ip,jr->prkl", {t, wa, wb});
}

at::Tensor delta_weight(const at::Tensor& w1, const at::Tensor& w2, double scale) {
  const at::Tensor left = w2.dim() == 4 ? w1.unsqueeze(2).unsqueeze(2) : w1;
  return at::mul(at::kron(left, w2.contiguous()), scale);
}

at::Tensor rank_dropout(const at::Tensor& delta, double rank_dropout, bool scale) {
  std::vector<int64_t> shape(delta.dim(), 1);
  shape[0] = -1;
  at::Tensor keep = at::rand({delta.size(0)}).gt(rank_dropout).to(at::kFloat).view(shape).to(delta.device());
  if (scale) keep = at::div(keep, keep.mean());
  // PEFT's `weight *= drop`: the product in the delta's dtype.
  return at::mul(delta, keep).to(delta.scalar_type());
}

}  // namespace d9d::peft::lokr
