#include <d9d/peft/lora/math.h>

#include <ATen/Functions.h>

namespace d9d::peft::lora {

namespace {

at::ScalarType compute_type(const at::Tensor& weight) {
  return weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

/// DoRA normalises each output row of a linear weight, each embedding
/// dimension (column) of an embedding's.
int64_t norm_dim(LayerKind kind) { return kind == LayerKind::Linear ? 1 : 0; }

at::Tensor as_broadcast(LayerKind kind, const at::Tensor& per_slice) {
  return kind == LayerKind::Linear ? per_slice.view({-1, 1}) : per_slice.view({1, -1});
}

/// `W + s * delta` in the compute type, fused (`addmm`).
at::Tensor summed(LayerKind kind, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale) {
  const at::ScalarType type = compute_type(weight);
  const at::Tensor w = weight.to(type), a_ = a.to(type), b_ = b.to(type);
  return kind == LayerKind::Linear ? w.addmm(b_, a_, /*beta=*/1.0, /*alpha=*/scale) : w.add(b_.mm(a_).t(), scale);
}

/// `W + (B @ A) * s` in the compute type, in PEFT's order of operations: DoRA's
/// norm divides by it, so the rounding should be PEFT's.
at::Tensor dora_sum(LayerKind kind, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale);

}  // namespace

at::Tensor delta_weight(LayerKind kind, const at::Tensor& a, const at::Tensor& b, double scale,
                        const at::Tensor& weight) {
  const at::ScalarType type = compute_type(weight);
  const at::Tensor product = b.to(type).mm(a.to(type));
  return (kind == LayerKind::Linear ? product : product.t()).mul(scale);
}

namespace {

at::Tensor dora_sum(LayerKind kind, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale) {
  return weight.to(compute_type(weight)).add(delta_weight(kind, a, b, scale, weight));
}

}  // namespace

at::Tensor dora_norm(LayerKind kind, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b,
                     double scale) {
  return at::linalg_vector_norm(dora_sum(kind, weight, a, b, scale), 2, {norm_dim(kind)});
}

at::Tensor merged_weight(LayerKind kind, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b,
                         double scale, const at::Tensor& magnitude, at::Tensor* norm_out) {
  if (!magnitude.defined()) return summed(kind, weight, a, b, scale).to(weight.scalar_type());
  // DoRA, as PEFT: the sum is formed once and gives its own norm;
  // W' = m / ||W + s·ΔW|| * (W + s·ΔW).
  const at::Tensor sum = dora_sum(kind, weight, a, b, scale);
  const at::Tensor norm = at::linalg_vector_norm(sum, 2, {norm_dim(kind)});
  if (norm_out) *norm_out = norm;
  return sum.mul(as_broadcast(kind, magnitude.to(sum.scalar_type()).div(norm))).to(weight.scalar_type());
}

namespace {

/// `weight += scale * delta` in place where the weight is the compute type; false otherwise.
bool add_in_place(LayerKind kind, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale) {
  const at::ScalarType type = weight.scalar_type();
  if (type != compute_type(weight)) return false;
  const at::Tensor a_ = a.to(type), b_ = b.to(type);
  if (kind == LayerKind::Linear) weight.addmm_(b_, a_, /*beta=*/1.0, /*alpha=*/scale);
  else weight.add_(b_.mm(a_).t(), scale);
  return true;
}

}  // namespace

void merge_in_place(LayerKind kind, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale,
                    const at::Tensor& magnitude, at::Tensor* norm_out) {
  if (!magnitude.defined() && add_in_place(kind, weight, a, b, scale)) return;
  weight.copy_(merged_weight(kind, weight, a, b, scale, magnitude, norm_out));
}

void unmerge_in_place(LayerKind kind, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale,
                      const at::Tensor& magnitude, const at::Tensor& norm) {
  if (!magnitude.defined() && add_in_place(kind, weight, a, b, -scale)) return;
  weight.copy_(unmerged_weight(kind, weight, a, b, scale, magnitude, norm));
}

at::Tensor unmerged_weight(LayerKind kind, const at::Tensor& merged, const at::Tensor& a, const at::Tensor& b,
                           double scale, const at::Tensor& magnitude, const at::Tensor& norm) {
  const at::ScalarType type = compute_type(merged);
  at::Tensor w = merged.to(type);
  if (magnitude.defined()) {
    // PEFT's unmerge: W = W' / (m / ||W + s·ΔW||) - s·ΔW, with the norm the merge used.
    w = w.div(as_broadcast(kind, magnitude.to(type).div(norm.to(type))));
  }
  return w.sub(delta_weight(kind, a, b, scale, merged)).to(merged.scalar_type());
}

}  // namespace d9d::peft::lora
