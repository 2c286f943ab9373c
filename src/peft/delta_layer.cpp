// What the DeltaLayer family shares outside its templates.
#include <d9d/peft/delta_layer.h>

#include <ATen/Functions.h>

#include <fmt/format.h>

#include <type_traits>

namespace d9d::peft {

std::string zero_padded_delta_refusal(const std::string& method, const std::string& name,
                                      const torch::nn::Conv2dOptions& o) {
  // Unqualified `visit`: c10::visit (LibTorch 1.13) or std::visit (2.x), found by argument.
  const bool zeros = visit(
      [](const auto& m) { return std::is_same_v<std::decay_t<decltype(m)>, torch::enumtype::kZeros>; },
      o.padding_mode());
  if (zeros) return {};
  return fmt::format("{}: '{}' is a Conv2d with padding_mode {}; PEFT convolves the input with the adapter's delta "
                     "padding with zeros, so the adapter's term would not be the base's, and a merge would change "
                     "the outputs. {} adapts Conv2d layers with padding_mode zeros only; narrow the targets to "
                     "exclude it",
                     method, name, torch::enumtype::get_enum_name(o.padding_mode()), method);
}

at::Tensor added_delta(const at::Tensor& weight, const at::Tensor& delta) {
  return at::add(weight, delta).to(weight.scalar_type());
}

at::Tensor subtracted_delta(const at::Tensor& weight, const at::Tensor& delta) {
  return at::sub(weight, delta).to(weight.scalar_type());
}

}  // namespace d9d::peft
