// The LoKr wrapper around a Conv2d layer, as PEFT's lokr.Conv2d.
#include <d9d/peft/conv_delta.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lokr/conv2d.h>

namespace d9d::peft {

LoKrConv2dImpl::LoKrConv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base_, const LoKrParameters& options,
                               const std::string& adapter_name)
    : base(std::move(base_)) {
  if (!base) throw PeftError("LoKrConv2dImpl: the base layer is null");
  if (auto why = zero_padded_delta_refusal("LoKr", "the base layer", base->options); !why.empty()) {
    throw PeftError(why);
  }
  register_module("base", base);
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

at::Tensor LoKrConv2dImpl::base_forward(const at::Tensor& input) const { return base->forward_base(input); }

at::Tensor LoKrConv2dImpl::delta_forward(const at::Tensor& input, const at::Tensor& delta) const {
  return base->convolve(input, delta, at::Tensor());
}

torch::nn::AnyModule LoKrConv2dImpl::unwrap() {
  base->clear_override();
  return torch::nn::AnyModule(base);
}

void LoKrConv2dImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoKrConv2d"); }

}  // namespace d9d::peft
