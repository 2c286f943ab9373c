#include <d9d/peft/loha/math.h>

#include <ATen/Functions.h>

#include <vector>

namespace d9d::peft::loha {

at::Tensor delta_weight(const at::Tensor& w1_a, const at::Tensor& w1_b, const at::Tensor& w2_a,
                        const at::Tensor& w2_b, double scale) {
  // PEFT multiplies by torch.tensor(scale), a float32 scalar: the same rounding here.
  return at::mul(at::mul(at::mm(w1_a, w1_b), at::mm(w2_a, w2_b)), at::scalar_tensor(scale, at::kFloat));
}

at::Tensor delta_weight_cp(const at::Tensor& t1, const at::Tensor& w1_a, const at::Tensor& w1_b, const at::Tensor& t2,
                           const at::Tensor& w2_a, const at::Tensor& w2_b, double scale) {
  const at::Tensor rebuild1 = at::einsum("ijkl,jr,ip->prkl", {t1, w1_b, w1_a});
  const at::Tensor rebuild2 = at::einsum("ijkl,jr,ip->prkl", {t2, w2_b, w2_a});
  return at::mul(at::mul(rebuild1, rebuild2), at::scalar_tensor(scale, at::kFloat));
}

at::Tensor rank_dropout(const at::Tensor& delta, double rank_dropout) {
  at::Tensor keep = at::rand({delta.size(0)}).gt(rank_dropout).to(delta.scalar_type());
  std::vector<int64_t> shape(delta.dim(), 1);
  shape[0] = -1;
  keep = keep.view(shape).to(delta.device());
  // Not a scaled dropout: PEFT (and LyCORIS) divide by the kept fraction of this draw.
  keep = at::div(keep, keep.mean());
  return at::mul(delta, keep);
}

}  // namespace d9d::peft::loha
