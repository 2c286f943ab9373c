// The LoHa wrapper around a Conv2d layer, as PEFT's loha.Conv2d.
#include <d9d/peft/errors.h>
#include <d9d/peft/loha/conv2d.h>

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

LoHaConv2dImpl::LoHaConv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base_, const LoHaParameters& options,
                               const std::string& adapter_name)
    : base(std::move(base_)) {
  if (!base) throw PeftError("LoHaConv2dImpl: the base layer is null");
  if (auto why = zero_padded_delta_refusal("LoHa", "the base layer", base->options); !why.empty()) {
    throw PeftError(why);
  }
  register_module("base", base);
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

at::Tensor LoHaConv2dImpl::base_forward(const at::Tensor& input) const { return base->forward_base(input); }

at::Tensor LoHaConv2dImpl::delta_forward(const at::Tensor& input, const at::Tensor& delta) const {
  return base->convolve(input, delta, at::Tensor());
}

torch::nn::AnyModule LoHaConv2dImpl::unwrap() {
  base->clear_override();
  return torch::nn::AnyModule(base);
}

void LoHaConv2dImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoHaConv2d"); }

}  // namespace d9d::peft
