#include <d9d/peft/ia3/math.h>

#include <ATen/Functions.h>

namespace d9d::peft::ia3 {

at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& l) {
  return at::mul(weight, l).to(weight.scalar_type());
}

at::Tensor merged_bias(const at::Tensor& bias, const at::Tensor& l) {
  return at::mul(bias, l.reshape(bias.sizes())).to(bias.scalar_type());
}

at::Tensor unmerged_weight(const at::Tensor& weight, const at::Tensor& l) {
  return at::div(weight, l.add(1e-8)).to(weight.scalar_type());
}

at::Tensor unmerged_bias(const at::Tensor& bias, const at::Tensor& l) {
  return at::div(bias, l.reshape(bias.sizes()).add(1e-8)).to(bias.scalar_type());
}

}  // namespace d9d::peft::ia3
