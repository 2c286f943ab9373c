// The (IA)³ wrapper around a linear layer.
#include <d9d/detail/torch_compat.h>
#include <d9d/peft/detail/adapter_set_impl.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/ia3/linear.h>
#include <d9d/peft/ia3/math.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/linear.h>

#include <fmt/format.h>

namespace d9d::peft {

IA3LinearAdapterImpl::IA3LinearAdapterImpl(int64_t in_features, int64_t out_features, const IA3Parameters& options,
                                           const at::TensorOptions& like)
    : options_(options) {
  const std::vector<int64_t> shape = options.feedforward() ? std::vector<int64_t>{1, in_features}
                                                           : std::vector<int64_t>{out_features, 1};
  torch::NoGradGuard no_grad;
  at::Tensor l = options.init_ones() ? at::ones(shape, like) : at::randn(shape, like);
  ia3_l = register_parameter("ia3_l", l);
}

void IA3LinearAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::IA3LinearAdapter(" << (options_.feedforward() ? "feedforward" : "output") << ")";
}

IA3LinearImpl::IA3LinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const IA3Parameters& options,
                             const std::string& adapter_name)
    : WrappedLinear(std::move(base), *this), feedforward_(options.feedforward()) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

IA3LinearImpl::IA3LinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const IA3Parameters& options,
                             const std::string& adapter_name)
    : WrappedLinear(std::move(base), *this), feedforward_(options.feedforward()) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void IA3LinearImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  const auto* o = dynamic_cast<const IA3Parameters*>(&options);
  if (!o) throw PeftError("add_adapter: an IA3 layer takes IA3Parameters as the adapter's options");
  if (o->feedforward() != feedforward_) {
    throw PeftError(fmt::format("add_adapter(\"{}\"): this IA3 layer scales its {}, the new adapter its {}; every "
                                "adapter of a layer agrees on feedforward_modules",
                                name, feedforward_ ? "input" : "output", o->feedforward() ? "input" : "output"));
  }
  const auto& w = base_weight();
  append(name, std::make_shared<IA3LinearAdapterImpl>(w.size(1), w.size(0), *o, w.options()));
}

void IA3LinearImpl::relayout() {
  clear_further_adapters();
  d9d::detail::torch_compat::unregister_parameter(*this, "ia3_l");
  ia3_l = at::Tensor();
  if (entries_.empty()) return;
  const auto& top = entries_.front().second;
  ia3_l = register_parameter("ia3_l", top->ia3_l, top->ia3_l.requires_grad());
  register_further_adapters();
}

at::Tensor IA3LinearImpl::forward(const at::Tensor& input) {
  const at::Tensor& weight = base_weight();
  const at::Tensor& bias = base_bias();
  at::Tensor scaling;
  if (enabled_) {
    for (const auto& name : active_) {
      if (is_merged(name)) continue;
      const at::Tensor l = find(name)->ia3_l.flatten();
      scaling = scaling.defined() ? scaling * l : l;
    }
  }
  if (!scaling.defined()) return torch::nn::functional::linear(input, weight, bias);
  if (feedforward_) {
    // PEFT: (x in the adapter's dtype * l), back in the input's dtype, through the base.
    return torch::nn::functional::linear((input.to(scaling.scalar_type()) * scaling).to(input.scalar_type()), weight,
                                         bias);
  }
  const at::Tensor out = torch::nn::functional::linear(input, weight, bias);
  return (out * scaling).to(out.scalar_type());
}

at::Tensor IA3LinearImpl::delta_weight(const std::string& name) const {
  adapter(name);
  throw PeftError("delta_weight: an IA3 adapter scales the weight; its merge is not a sum (use merge_adapter)");
}

void IA3LinearImpl::merge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = require_merged(name, false, "merge_adapter");
  base_weight().copy_(ia3::merged_weight(base_weight(), a.ia3_l));
  if (!feedforward_ && base_bias().defined()) base_bias().copy_(ia3::merged_bias(base_bias(), a.ia3_l));
  set_merged(name, true);
}

void IA3LinearImpl::unmerge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = require_merged(name, true, "unmerge_adapter");
  base_weight().copy_(ia3::unmerged_weight(base_weight(), a.ia3_l));
  if (!feedforward_ && base_bias().defined()) base_bias().copy_(ia3::unmerged_bias(base_bias(), a.ia3_l));
  set_merged(name, false);
}

torch::nn::AnyModule IA3LinearImpl::unwrap() { return unwrap_base(); }

void IA3LinearImpl::describe(std::ostream& stream, const IA3LinearAdapterImpl& adapter) const {
  stream << (adapter.options().feedforward() ? "feedforward" : "output");
}

void IA3LinearImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::IA3Linear"); }

template class AdapterSetLayer<IA3LinearAdapterImpl>;

}  // namespace d9d::peft
