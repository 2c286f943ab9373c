// The (IA)³ wrapper around a Conv2d layer, as PEFT's ia3.Conv2d.
#include <d9d/peft/errors.h>
#include <d9d/peft/ia3/conv2d.h>
#include <d9d/peft/ia3/math.h>

#include <torch/csrc/autograd/grad_mode.h>

namespace d9d::peft {

IA3Conv2dImpl::IA3Conv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base_, const IA3Parameters& options,
                             const std::string& adapter_name)
    : IA3LayerImpl(options.feedforward()), base(std::move(base_)) {
  if (!base) throw PeftError("IA3Conv2dImpl: the base layer is null");
  register_module("base", base);
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

std::vector<int64_t> IA3Conv2dImpl::vector_shape() const {
  const auto& c = base->options;
  return {1, feedforward_ ? c.in_channels() : c.out_channels(), 1, 1};
}

at::Tensor IA3Conv2dImpl::forward(const at::Tensor& input) {
  const at::Tensor scaling = active_scaling();
  if (!scaling.defined()) return base->forward_base(input);
  // PEFT: the input in the adapter's dtype times l, in the weight's dtype,
  // through the base; or the base's output in the adapter's dtype times l;
  // either back in the input's dtype.
  if (feedforward_) {
    return base->forward_base((input.to(scaling.scalar_type()) * scaling).to(base->weight.scalar_type()))
        .to(input.scalar_type());
  }
  return (base->forward_base(input).to(scaling.scalar_type()) * scaling).to(input.scalar_type());
}

void IA3Conv2dImpl::merge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = require_merged(name, false, "merge_adapter");
  const at::Tensor scale =
      ia3::conv_weight_scale(a.ia3_l, feedforward_, base->options.groups(), base->options.out_channels());
  base->weight.copy_(ia3::merged_weight(base->weight, scale));
  if (!feedforward_ && base->bias.defined()) base->bias.copy_(ia3::merged_bias(base->bias, a.ia3_l));
  set_merged(name, true);
}

void IA3Conv2dImpl::unmerge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = require_merged(name, true, "unmerge_adapter");
  const at::Tensor scale =
      ia3::conv_weight_scale(a.ia3_l, feedforward_, base->options.groups(), base->options.out_channels());
  base->weight.copy_(ia3::unmerged_weight(base->weight, scale));
  if (!feedforward_ && base->bias.defined()) base->bias.copy_(ia3::unmerged_bias(base->bias, a.ia3_l));
  set_merged(name, false);
}

torch::nn::AnyModule IA3Conv2dImpl::unwrap() {
  base->clear_override();
  return torch::nn::AnyModule(base);
}

void IA3Conv2dImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::IA3Conv2d"); }

}  // namespace d9d::peft
