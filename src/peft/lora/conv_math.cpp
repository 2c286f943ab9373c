#include <d9d/peft/lora/conv_math.h>

#include <ATen/Functions.h>

namespace d9d::peft::lora {

namespace {

at::ScalarType compute_type(const at::Tensor& weight) {
  return weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

/// One factor per output channel, shaped to scale a `[out, in, kh, kw]` weight.
at::Tensor per_channel(const at::Tensor& t) { return t.reshape({-1, 1, 1, 1}); }

}  // namespace

at::Tensor conv_delta_weight(const at::Tensor& a, const at::Tensor& b, double scale, const at::Tensor& weight) {
  const at::ScalarType type = compute_type(weight);
  const at::Tensor a_ = a.to(type), b_ = b.to(type);
  if (weight.size(2) == 1 && weight.size(3) == 1) {
    return b_.squeeze(3).squeeze(2).mm(a_.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3).mul(scale);
  }
  return at::conv2d(a_.transpose(0, 1), b_).transpose(0, 1).mul(scale);
}

at::Tensor conv_dora_norm(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale) {
  const at::ScalarType type = compute_type(weight);
  const int64_t r = a.size(0);
  const at::Tensor lora_weight = b.to(type).reshape({-1, r}).mm(a.to(type).reshape({r, -1})).reshape(weight.sizes());
  const at::Tensor sum = weight.to(type).add(lora_weight, scale);
  return at::linalg_vector_norm(sum, 2, {1, 2, 3}, /*keepdim=*/true).transpose(1, 0);
}

at::Tensor conv_merged_weight(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale,
                              const at::Tensor& magnitude, at::Tensor* norm_out) {
  const at::Tensor sum = weight.to(compute_type(weight)).add(conv_delta_weight(a, b, scale, weight));
  if (!magnitude.defined()) return sum.to(weight.scalar_type());
  // PEFT's DoRA merge: the norm of the sum formed with the merge's delta.
  const at::Tensor norm = at::linalg_vector_norm(sum, 2, {1, 2, 3});
  if (norm_out) *norm_out = norm;
  return sum.mul(per_channel(magnitude.to(sum.scalar_type()).reshape({-1}).div(norm))).to(weight.scalar_type());
}

at::Tensor conv_unmerged_weight(const at::Tensor& merged, const at::Tensor& a, const at::Tensor& b, double scale,
                                const at::Tensor& magnitude, const at::Tensor& norm) {
  const at::ScalarType type = compute_type(merged);
  at::Tensor w = merged.to(type);
  if (magnitude.defined()) w = w.div(per_channel(magnitude.to(type).reshape({-1}).div(norm.to(type))));
  return w.sub(conv_delta_weight(a, b, scale, merged)).to(merged.scalar_type());
}

}  // namespace d9d::peft::lora
