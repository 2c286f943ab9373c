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

at::Tensor conv_weight_scale(const at::Tensor& l, bool feedforward, int64_t groups, int64_t out_channels) {
  if (!feedforward) return l.transpose(0, 1);
  if (groups == 1) return l;
  const int64_t in_per_group = l.size(1) / groups, out_per_group = out_channels / groups;
  return l.reshape({groups, 1, in_per_group, 1, 1})
      .expand({groups, out_per_group, in_per_group, 1, 1})
      .reshape({out_channels, in_per_group, 1, 1});
}

}  // namespace d9d::peft::ia3
