// What the LoHa layers share: the adapters' factors (flat or CP), their
// rank dropout, the key layout.
#include <d9d/detail/torch_compat.h>
#include <d9d/peft/detail/delta_layer_impl.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/loha/layer.h>
#include <d9d/peft/loha/math.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/init.h>

#include <cmath>
#include <functional>
#include <numeric>

namespace d9d::peft {

namespace {

const char* const kFactors[] = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"};

}  // namespace

LoHaAdapterImpl::LoHaAdapterImpl(const std::vector<int64_t>& weight_shape, const LoHaParameters& options,
                                 const at::TensorOptions& like)
    : options_(options), weight_shape_(weight_shape) {
  const int64_t r = options.r();
  const int64_t out = weight_shape.at(0);
  // PEFT disables the CP form on 1x1 kernels (a pointwise convolution is a matrix product).
  const bool cp_form = options.use_effective_conv2d() && weight_shape.size() == 4 &&
                       !(weight_shape[2] == 1 && weight_shape[3] == 1);
  torch::NoGradGuard no_grad;
  // PEFT's reset_adapter_parameters: kaiming-uniform(a=sqrt(5)) everywhere,
  // w2_b zeros unless init_weights is false; the CP cores after the factors.
  auto kaiming = [&](std::vector<int64_t> shape) {
    at::Tensor t = at::empty(shape, like);
    torch::nn::init::kaiming_uniform_(t, std::sqrt(5.0));
    return t;
  };
  std::vector<int64_t> a_shape{out, r};
  std::vector<int64_t> b_shape{
      r, std::accumulate(weight_shape.begin() + 1, weight_shape.end(), int64_t{1}, std::multiplies<int64_t>())};
  if (cp_form) {
    a_shape = {r, out};
    b_shape = {r, weight_shape[1]};
  }
  hada_w1_a = register_parameter("hada_w1_a", kaiming(a_shape));
  hada_w1_b = register_parameter("hada_w1_b", kaiming(b_shape));
  hada_w2_a = register_parameter("hada_w2_a", kaiming(a_shape));
  hada_w2_b = register_parameter("hada_w2_b", options.init_weights() ? at::zeros(b_shape, like) : kaiming(b_shape));
  if (cp_form) {
    hada_t1 = register_parameter("hada_t1", kaiming({r, r, weight_shape[2], weight_shape[3]}));
    hada_t2 = register_parameter("hada_t2", kaiming({r, r, weight_shape[2], weight_shape[3]}));
  }
}

at::Tensor LoHaAdapterImpl::delta_weight() const {
  if (cp()) return loha::delta_weight_cp(hada_t1, hada_w1_a, hada_w1_b, hada_t2, hada_w2_a, hada_w2_b, scale());
  return loha::delta_weight(hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, scale()).reshape(weight_shape_);
}

at::Tensor LoHaAdapterImpl::rank_dropped(const at::Tensor& delta) const {
  return options_.rank_dropout() != 0 ? loha::rank_dropout(delta, options_.rank_dropout()) : delta;
}

void LoHaAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoHaAdapter(r=" << options_.r() << ", alpha=" << options_.alpha() << (cp() ? ", cp" : "")
         << ")";
}

void LoHaLayerImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  const auto* o = dynamic_cast<const LoHaParameters*>(&options);
  if (!o) throw PeftError("add_adapter: a LoHa layer takes LoHaParameters as the adapter's options");
  o->validate("add_adapter(\"" + name + "\")");
  const at::Tensor& w = adapted_weight();
  append(name, std::make_shared<LoHaAdapterImpl>(w.sizes().vec(), *o, w.options()));
}

void LoHaLayerImpl::relayout() {
  clear_further_adapters();
  at::Tensor* top[] = {&hada_w1_a, &hada_w1_b, &hada_w2_a, &hada_w2_b, &hada_t1, &hada_t2};
  for (int i = 0; i < 6; ++i) {
    d9d::detail::torch_compat::unregister_parameter(*this, kFactors[i]);
    *top[i] = at::Tensor();
  }
  if (entries_.empty()) return;
  const auto& a = *entries_.front().second;
  const at::Tensor* from[] = {&a.hada_w1_a, &a.hada_w1_b, &a.hada_w2_a, &a.hada_w2_b, &a.hada_t1, &a.hada_t2};
  for (int i = 0; i < 6; ++i) {
    if (from[i]->defined()) *top[i] = register_parameter(kFactors[i], *from[i], from[i]->requires_grad());
  }
  register_further_adapters();
}

void LoHaLayerImpl::describe(std::ostream& stream, const LoHaAdapterImpl& adapter) const {
  stream << "r=" << adapter.options().r() << ", alpha=" << adapter.options().alpha();
  if (adapter.cp()) stream << ", cp";
}

template class AdapterSetLayer<LoHaAdapterImpl>;
template class DeltaLayer<LoHaAdapterImpl>;

}  // namespace d9d::peft
