// What the (IA)³ layers share: the adapters' vectors, the feed-forward rule,
// the product of the active vectors, the key layout.
#include <d9d/detail/torch_compat.h>
#include <d9d/peft/detail/adapter_set_impl.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/ia3/layer.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <fmt/format.h>

namespace d9d::peft {

IA3AdapterImpl::IA3AdapterImpl(const std::vector<int64_t>& shape, const IA3Parameters& options,
                               const at::TensorOptions& like)
    : options_(options) {
  torch::NoGradGuard no_grad;
  at::Tensor l = options.init_ones() ? at::ones(shape, like) : at::randn(shape, like);
  ia3_l = register_parameter("ia3_l", l);
}

void IA3AdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::IA3Adapter(" << (options_.feedforward() ? "feedforward" : "output") << ")";
}

void IA3LayerImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  const auto* o = dynamic_cast<const IA3Parameters*>(&options);
  if (!o) throw PeftError("add_adapter: an IA3 layer takes IA3Parameters as the adapter's options");
  if (o->feedforward() != feedforward_) {
    throw PeftError(fmt::format("add_adapter(\"{}\"): this IA3 layer scales its {}, the new adapter its {}; every "
                                "adapter of a layer agrees on feedforward_modules",
                                name, feedforward_ ? "input" : "output", o->feedforward() ? "input" : "output"));
  }
  append(name, std::make_shared<IA3AdapterImpl>(vector_shape(), *o, weight_options()));
}

at::Tensor IA3LayerImpl::delta_weight(const std::string& name) const {
  adapter(name);
  throw PeftError("delta_weight: an IA3 adapter scales the weight; its merge is not a sum (use merge_adapter)");
}

at::Tensor IA3LayerImpl::active_scaling() const {
  at::Tensor scaling;
  if (!enabled_) return scaling;
  for (const auto& name : active_) {
    if (is_merged(name)) continue;
    const at::Tensor& l = find(name)->ia3_l;
    scaling = scaling.defined() ? scaling * l : l;
  }
  return scaling;
}

void IA3LayerImpl::relayout() {
  clear_further_adapters();
  d9d::detail::torch_compat::unregister_parameter(*this, "ia3_l");
  ia3_l = at::Tensor();
  if (entries_.empty()) return;
  const auto& top = entries_.front().second;
  ia3_l = register_parameter("ia3_l", top->ia3_l, top->ia3_l.requires_grad());
  register_further_adapters();
}

void IA3LayerImpl::describe(std::ostream& stream, const IA3AdapterImpl& adapter) const {
  stream << (adapter.options().feedforward() ? "feedforward" : "output");
}

template class AdapterSetLayer<IA3AdapterImpl>;

}  // namespace d9d::peft
