// The (IA)³ wrapper around a Conv2d layer, as PEFT's ia3.Conv2d.
#include <d9d/detail/torch_compat.h>
#include <d9d/peft/detail/adapter_set_impl.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/ia3/conv2d.h>
#include <d9d/peft/ia3/math.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <fmt/format.h>

namespace d9d::peft {

IA3Conv2dAdapterImpl::IA3Conv2dAdapterImpl(int64_t channels, const IA3Parameters& options,
                                           const at::TensorOptions& like)
    : options_(options) {
  torch::NoGradGuard no_grad;
  const std::vector<int64_t> shape{1, channels, 1, 1};
  at::Tensor l = options.init_ones() ? at::ones(shape, like) : at::randn(shape, like);
  ia3_l = register_parameter("ia3_l", l);
}

void IA3Conv2dAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::IA3Conv2dAdapter(" << (options_.feedforward() ? "feedforward" : "output") << ")";
}

IA3Conv2dImpl::IA3Conv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base_, const IA3Parameters& options,
                             const std::string& adapter_name)
    : base(std::move(base_)), feedforward_(options.feedforward()) {
  if (!base) throw PeftError("IA3Conv2dImpl: the base layer is null");
  register_module("base", base);
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void IA3Conv2dImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  const auto* o = dynamic_cast<const IA3Parameters*>(&options);
  if (!o) throw PeftError("add_adapter: an IA3 layer takes IA3Parameters as the adapter's options");
  if (o->feedforward() != feedforward_) {
    throw PeftError(fmt::format("add_adapter(\"{}\"): this IA3 layer scales its {}, the new adapter its {}; every "
                                "adapter of a layer agrees on feedforward_modules",
                                name, feedforward_ ? "input" : "output", o->feedforward() ? "input" : "output"));
  }
  const auto& c = base->options;
  append(name, std::make_shared<IA3Conv2dAdapterImpl>(feedforward_ ? c.in_channels() : c.out_channels(), *o,
                                                      base->weight.options()));
}

void IA3Conv2dImpl::relayout() {
  clear_further_adapters();
  d9d::detail::torch_compat::unregister_parameter(*this, "ia3_l");
  ia3_l = at::Tensor();
  if (entries_.empty()) return;
  const auto& top = entries_.front().second;
  ia3_l = register_parameter("ia3_l", top->ia3_l, top->ia3_l.requires_grad());
  register_further_adapters();
}

at::Tensor IA3Conv2dImpl::forward(const at::Tensor& input) {
  at::Tensor scaling;
  if (enabled_) {
    for (const auto& name : active_) {
      if (is_merged(name)) continue;
      const at::Tensor& l = find(name)->ia3_l;
      scaling = scaling.defined() ? scaling * l : l;
    }
  }
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

at::Tensor IA3Conv2dImpl::delta_weight(const std::string& name) const {
  adapter(name);
  throw PeftError("delta_weight: an IA3 adapter scales the weight; its merge is not a sum (use merge_adapter)");
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

void IA3Conv2dImpl::describe(std::ostream& stream, const IA3Conv2dAdapterImpl& adapter) const {
  stream << (adapter.options().feedforward() ? "feedforward" : "output");
}

void IA3Conv2dImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::IA3Conv2d"); }

template class AdapterSetLayer<IA3Conv2dAdapterImpl>;

}  // namespace d9d::peft
