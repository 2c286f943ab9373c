// What the LoKr layers share: the adapters' factors (Linear or Conv2d,
// whole, factored or CP), their rank dropout, the key layout.
#include <d9d/detail/torch_compat.h>
#include <d9d/peft/detail/delta_layer_impl.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lokr/layer.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/init.h>

#include <array>
#include <cmath>

namespace d9d::peft {

namespace {

constexpr std::array<const char*, 7> kFactors = {"lokr_w1",   "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                                 "lokr_w2_a", "lokr_w2_b", "lokr_t2"};

lokr::FactorShape shape_of(const std::vector<int64_t>& w, const LoKrParameters& o) {
  if (w.size() == 4) {
    return lokr::conv_shape(w[1], w[0], w[2], w[3], o.r(), o.decompose_both(), o.decompose_factor(),
                            o.use_effective_conv2d());
  }
  return lokr::linear_shape(w.at(1), w.at(0), o.r(), o.decompose_both(), o.decompose_factor());
}

}  // namespace

LoKrAdapterImpl::LoKrAdapterImpl(const std::vector<int64_t>& weight_shape, const LoKrParameters& options,
                                 const at::TensorOptions& like)
    : options_(options), shape_(shape_of(weight_shape, options)), weight_shape_(weight_shape) {
  const int64_t r = options.r();
  const LoKrInit init = options.init_weights();
  const auto& s = shape_;
  const bool conv = s.kh > 0;
  torch::NoGradGuard no_grad;
  // PEFT's reset_adapter_parameters{,_random,_lycoris_way}: kaiming-uniform
  // (a=sqrt(5)) except the one zero factor that makes a fresh adapter a
  // no-op, drawn in PEFT's order (w1 side, w2 side, then the CP core;
  // zeroing draws nothing).
  auto make = [&](const char* name, std::vector<int64_t> shape, bool zero) {
    at::Tensor t = at::empty(shape, like);
    if (zero) {
      t.zero_();
    } else {
      torch::nn::init::kaiming_uniform_(t, std::sqrt(5.0));
    }
    return register_parameter(name, t);
  };
  const bool zero_w1 = init == LoKrInit::kPeft, zero_w2 = init == LoKrInit::kLycoris;
  if (s.whole_w1) {
    lokr_w1 = make("lokr_w1", {s.a, s.c}, zero_w1);
  } else {
    lokr_w1_a = make("lokr_w1_a", {s.a, r}, zero_w1);
    lokr_w1_b = make("lokr_w1_b", {r, s.c}, false);
  }
  if (s.whole_w2) {
    lokr_w2 = make("lokr_w2", conv ? std::vector<int64_t>{s.b, s.d, s.kh, s.kw} : std::vector<int64_t>{s.b, s.d},
                   zero_w2);
  } else if (s.cp) {
    lokr_w2_a = make("lokr_w2_a", {r, s.b}, false);
    lokr_w2_b = make("lokr_w2_b", {r, s.d}, zero_w2);
  } else {
    lokr_w2_a = make("lokr_w2_a", {s.b, r}, false);
    lokr_w2_b = make("lokr_w2_b", {r, conv ? s.d * s.kh * s.kw : s.d}, zero_w2);
  }
  if (s.cp) lokr_t2 = make("lokr_t2", {r, r, s.kh, s.kw}, false);
}

at::Tensor LoKrAdapterImpl::w1() const { return lokr_w1.defined() ? lokr_w1 : at::mm(lokr_w1_a, lokr_w1_b); }

at::Tensor LoKrAdapterImpl::w2() const {
  if (lokr_w2.defined()) return lokr_w2;
  if (lokr_t2.defined()) return lokr::cp_weight(lokr_t2, lokr_w2_a, lokr_w2_b);
  return at::mm(lokr_w2_a, lokr_w2_b);
}

at::Tensor LoKrAdapterImpl::delta_weight() const {
  return lokr::delta_weight(w1(), w2(), scale()).reshape(weight_shape_);
}

at::Tensor LoKrAdapterImpl::rank_dropped(const at::Tensor& delta) const {
  if (options_.rank_dropout() == 0) return delta;
  return lokr::rank_dropout(delta, options_.rank_dropout(), options_.rank_dropout_scale());
}

void LoKrAdapterImpl::pretty_print(std::ostream& stream) const {
  const auto& s = shape_;
  stream << "d9d::peft::LoKrAdapter(r=" << options_.r() << ", alpha=" << options_.alpha() << ", w1=[" << s.a << ", "
         << s.c << "]" << (s.whole_w1 ? "" : " factored") << ", w2=[" << s.b << ", " << s.d;
  if (s.kh > 0) stream << ", " << s.kh << ", " << s.kw;
  stream << "]" << (s.whole_w2 ? "" : s.cp ? " cp" : " factored") << ")";
}

void LoKrLayerImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  const auto* o = dynamic_cast<const LoKrParameters*>(&options);
  if (!o) throw PeftError("add_adapter: a LoKr layer takes LoKrParameters as the adapter's options");
  o->validate("add_adapter(\"" + name + "\")");
  const at::Tensor& w = adapted_weight();
  append(name, std::make_shared<LoKrAdapterImpl>(w.sizes().vec(), *o, w.options()));
}

void LoKrLayerImpl::relayout() {
  clear_further_adapters();
  std::array<at::Tensor*, 7> top = {&lokr_w1, &lokr_w1_a, &lokr_w1_b, &lokr_w2, &lokr_w2_a, &lokr_w2_b, &lokr_t2};
  for (size_t i = 0; i < top.size(); ++i) {
    d9d::detail::torch_compat::unregister_parameter(*this, kFactors[i]);
    *top[i] = at::Tensor();
  }
  if (entries_.empty()) return;
  const auto& a = *entries_.front().second;
  const std::array<const at::Tensor*, 7> from = {&a.lokr_w1,   &a.lokr_w1_a, &a.lokr_w1_b, &a.lokr_w2,
                                                 &a.lokr_w2_a, &a.lokr_w2_b, &a.lokr_t2};
  for (size_t i = 0; i < top.size(); ++i) {
    if (from[i]->defined()) *top[i] = register_parameter(kFactors[i], *from[i], from[i]->requires_grad());
  }
  register_further_adapters();
}

void LoKrLayerImpl::describe(std::ostream& stream, const LoKrAdapterImpl& adapter) const {
  stream << "r=" << adapter.options().r() << ", alpha=" << adapter.options().alpha();
  if (adapter.shape().cp) stream << ", cp";
}

template class AdapterSetLayer<LoKrAdapterImpl>;
template class DeltaLayer<LoKrAdapterImpl>;

}  // namespace d9d::peft
