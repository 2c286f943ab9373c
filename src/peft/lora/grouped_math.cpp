#include <d9d/peft/lora/grouped_math.h>

#include <ATen/Functions.h>

namespace d9d::peft::lora {

namespace {

at::ScalarType compute_type(const at::Tensor& weight) {
  return weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void add_scaled(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale) {
  const at::ScalarType type = compute_type(weight);
  if (weight.scalar_type() == type) {
    weight.baddbmm_(a.to(type), b.to(type), /*beta=*/1.0, /*alpha=*/scale);
    return;
  }
  weight.copy_(weight.to(type).baddbmm(a.to(type), b.to(type), /*beta=*/1.0, /*alpha=*/scale));
}

}  // namespace

at::Tensor grouped_delta_weight(const at::Tensor& a, const at::Tensor& b, double scale, const at::Tensor& weight) {
  const at::ScalarType type = compute_type(weight);
  return at::bmm(a.to(type), b.to(type)).mul(scale);
}

void grouped_merge_in_place(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale) {
  add_scaled(weight, a, b, scale);
}

void grouped_unmerge_in_place(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale) {
  add_scaled(weight, a, b, -scale);
}

}  // namespace d9d::peft::lora
