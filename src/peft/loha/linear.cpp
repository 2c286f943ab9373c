// The LoHa wrapper around a linear layer.
#include <d9d/detail/torch_compat.h>
#include <d9d/peft/detail/adapter_set_impl.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/loha/linear.h>
#include <d9d/peft/loha/math.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>

#include <cmath>

namespace d9d::peft {

namespace {

const char* const kFactors[] = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"};

}  // namespace

LoHaLinearAdapterImpl::LoHaLinearAdapterImpl(int64_t in_features, int64_t out_features,
                                             const LoHaParameters& options, const at::TensorOptions& like)
    : options_(options) {
  const int64_t r = options.r();
  torch::NoGradGuard no_grad;
  // PEFT's reset_adapter_parameters: kaiming-uniform(a=sqrt(5)) everywhere,
  // w2_b zeros unless init_weights is false.
  auto kaiming = [&](std::vector<int64_t> shape) {
    at::Tensor t = at::empty(shape, like);
    torch::nn::init::kaiming_uniform_(t, std::sqrt(5.0));
    return t;
  };
  hada_w1_a = register_parameter("hada_w1_a", kaiming({out_features, r}));
  hada_w1_b = register_parameter("hada_w1_b", kaiming({r, in_features}));
  hada_w2_a = register_parameter("hada_w2_a", kaiming({out_features, r}));
  hada_w2_b = register_parameter("hada_w2_b", options.init_weights() ? at::zeros({r, in_features}, like)
                                                                     : kaiming({r, in_features}));
}

at::Tensor LoHaLinearAdapterImpl::delta_weight() const {
  return loha::delta_weight(hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, scale());
}

void LoHaLinearAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoHaLinearAdapter(r=" << options_.r() << ", alpha=" << options_.alpha() << ")";
}

LoHaLinearImpl::LoHaLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoHaParameters& options,
                               const std::string& adapter_name)
    : WrappedLinear(std::move(base), *this) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

LoHaLinearImpl::LoHaLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoHaParameters& options,
                               const std::string& adapter_name)
    : WrappedLinear(std::move(base), *this) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void LoHaLinearImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  const auto* o = dynamic_cast<const LoHaParameters*>(&options);
  if (!o) throw PeftError("add_adapter: a LoHa layer takes LoHaParameters as the adapter's options");
  o->validate("add_adapter(\"" + name + "\")");
  const auto& w = base_weight();
  append(name, std::make_shared<LoHaLinearAdapterImpl>(w.size(1), w.size(0), *o, w.options()));
}

void LoHaLinearImpl::relayout() {
  clear_further_adapters();
  at::Tensor* top[] = {&hada_w1_a, &hada_w1_b, &hada_w2_a, &hada_w2_b};
  for (int i = 0; i < 4; ++i) {
    d9d::detail::torch_compat::unregister_parameter(*this, kFactors[i]);
    *top[i] = at::Tensor();
  }
  if (entries_.empty()) return;
  const auto& a = *entries_.front().second;
  const at::Tensor* from[] = {&a.hada_w1_a, &a.hada_w1_b, &a.hada_w2_a, &a.hada_w2_b};
  for (int i = 0; i < 4; ++i) *top[i] = register_parameter(kFactors[i], *from[i], from[i]->requires_grad());
  register_further_adapters();
}

at::Tensor LoHaLinearImpl::forward(const at::Tensor& input) {
  at::Tensor result = torch::nn::functional::linear(input, base_weight(), base_bias());
  if (!enabled_) return result;
  for (const auto& name : active_) {
    if (is_merged(name)) continue;
    const auto& a = adapter(name);
    // PEFT draws torch.rand(1) for every adapter in training, whatever module_dropout is.
    if (is_training() && !(at::rand({1}).item<double>() > a.options().module_dropout())) continue;
    at::Tensor delta = a.delta_weight();
    if (is_training() && a.options().rank_dropout() != 0) delta = loha::rank_dropout(delta, a.options().rank_dropout());
    result = result + torch::nn::functional::linear(input.to(delta.scalar_type()), delta);
  }
  return result.to(input.scalar_type());
}

at::Tensor LoHaLinearImpl::delta_weight(const std::string& name) const { return adapter(name).delta_weight(); }

void LoHaLinearImpl::merge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = require_merged(name, false, "merge_adapter");
  base_weight().copy_(loha::merged_weight(base_weight(), a.delta_weight()));
  set_merged(name, true);
}

void LoHaLinearImpl::unmerge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = require_merged(name, true, "unmerge_adapter");
  base_weight().copy_(loha::unmerged_weight(base_weight(), a.delta_weight()));
  set_merged(name, false);
}

torch::nn::AnyModule LoHaLinearImpl::unwrap() { return unwrap_base(); }

void LoHaLinearImpl::describe(std::ostream& stream, const LoHaLinearAdapterImpl& adapter) const {
  stream << "r=" << adapter.options().r() << ", alpha=" << adapter.options().alpha();
}

void LoHaLinearImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoHaLinear"); }

template class AdapterSetLayer<LoHaLinearAdapterImpl>;

}  // namespace d9d::peft
