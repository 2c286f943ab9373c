// The LoKr wrapper around a linear layer.
#include <d9d/detail/torch_compat.h>
#include <d9d/peft/detail/adapter_set_impl.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lokr/linear.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>

#include <array>
#include <cmath>

namespace d9d::peft {

namespace {

constexpr std::array<const char*, 6> kFactors = {"lokr_w1", "lokr_w1_a", "lokr_w1_b",
                                                 "lokr_w2", "lokr_w2_a", "lokr_w2_b"};

}  // namespace

LoKrLinearAdapterImpl::LoKrLinearAdapterImpl(int64_t in_features, int64_t out_features,
                                             const LoKrParameters& options, const at::TensorOptions& like)
    : options_(options),
      shape_(lokr::linear_shape(in_features, out_features, options.r(), options.decompose_both(),
                                options.decompose_factor())) {
  const int64_t r = options.r();
  const LoKrInit init = options.init_weights();
  torch::NoGradGuard no_grad;
  // PEFT's reset_adapter_parameters{,_random,_lycoris_way}: kaiming-uniform
  // (a=sqrt(5)) except the one zero factor that makes a fresh adapter a
  // no-op, drawn in PEFT's order (w1 side, then w2 side; zeroing draws nothing).
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
  if (shape_.whole_w1) {
    lokr_w1 = make("lokr_w1", {shape_.a, shape_.c}, zero_w1);
  } else {
    lokr_w1_a = make("lokr_w1_a", {shape_.a, r}, zero_w1);
    lokr_w1_b = make("lokr_w1_b", {r, shape_.c}, false);
  }
  if (shape_.whole_w2) {
    lokr_w2 = make("lokr_w2", {shape_.b, shape_.d}, zero_w2);
  } else {
    lokr_w2_a = make("lokr_w2_a", {shape_.b, r}, false);
    lokr_w2_b = make("lokr_w2_b", {r, shape_.d}, zero_w2);
  }
}

at::Tensor LoKrLinearAdapterImpl::w1() const { return lokr_w1.defined() ? lokr_w1 : at::mm(lokr_w1_a, lokr_w1_b); }

at::Tensor LoKrLinearAdapterImpl::w2() const { return lokr_w2.defined() ? lokr_w2 : at::mm(lokr_w2_a, lokr_w2_b); }

at::Tensor LoKrLinearAdapterImpl::delta_weight() const { return lokr::delta_weight(w1(), w2(), scale()); }

void LoKrLinearAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoKrLinearAdapter(r=" << options_.r() << ", alpha=" << options_.alpha() << ", w1=["
         << shape_.a << ", " << shape_.c << "]" << (shape_.whole_w1 ? "" : " factored") << ", w2=[" << shape_.b
         << ", " << shape_.d << "]" << (shape_.whole_w2 ? "" : " factored") << ")";
}

LoKrLinearImpl::LoKrLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoKrParameters& options,
                               const std::string& adapter_name)
    : WrappedLinear(std::move(base), *this) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

LoKrLinearImpl::LoKrLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoKrParameters& options,
                               const std::string& adapter_name)
    : WrappedLinear(std::move(base), *this) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void LoKrLinearImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  const auto* o = dynamic_cast<const LoKrParameters*>(&options);
  if (!o) throw PeftError("add_adapter: a LoKr layer takes LoKrParameters as the adapter's options");
  o->validate("add_adapter(\"" + name + "\")");
  const auto& w = base_weight();
  append(name, std::make_shared<LoKrLinearAdapterImpl>(w.size(1), w.size(0), *o, w.options()));
}

void LoKrLinearImpl::relayout() {
  clear_further_adapters();
  std::array<at::Tensor*, 6> top = {&lokr_w1, &lokr_w1_a, &lokr_w1_b, &lokr_w2, &lokr_w2_a, &lokr_w2_b};
  for (size_t i = 0; i < top.size(); ++i) {
    d9d::detail::torch_compat::unregister_parameter(*this, kFactors[i]);
    *top[i] = at::Tensor();
  }
  if (entries_.empty()) return;
  const auto& a = *entries_.front().second;
  const std::array<const at::Tensor*, 6> from = {&a.lokr_w1, &a.lokr_w1_a, &a.lokr_w1_b,
                                                 &a.lokr_w2, &a.lokr_w2_a, &a.lokr_w2_b};
  for (size_t i = 0; i < top.size(); ++i) {
    if (from[i]->defined()) *top[i] = register_parameter(kFactors[i], *from[i], from[i]->requires_grad());
  }
  register_further_adapters();
}

at::Tensor LoKrLinearImpl::forward(const at::Tensor& input) {
  at::Tensor result = torch::nn::functional::linear(input, base_weight(), base_bias());
  if (!enabled_) return result;
  for (const auto& name : active_) {
    if (is_merged(name)) continue;
    const auto& a = adapter(name);
    const LoKrParameters& o = a.options();
    // PEFT draws torch.rand(1) for every adapter in training, whatever module_dropout is.
    if (is_training() && !(at::rand({1}).item<double>() > o.module_dropout())) continue;
    at::Tensor delta = a.delta_weight();
    if (is_training() && o.rank_dropout() != 0) delta = lokr::rank_dropout(delta, o.rank_dropout(), o.rank_dropout_scale());
    result = result + torch::nn::functional::linear(input.to(delta.scalar_type()), delta);
  }
  return result.to(input.scalar_type());
}

at::Tensor LoKrLinearImpl::delta_weight(const std::string& name) const { return adapter(name).delta_weight(); }

void LoKrLinearImpl::merge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = require_merged(name, false, "merge_adapter");
  base_weight().copy_(lokr::merged_weight(base_weight(), a.delta_weight()));
  set_merged(name, true);
}

void LoKrLinearImpl::unmerge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = require_merged(name, true, "unmerge_adapter");
  base_weight().copy_(lokr::unmerged_weight(base_weight(), a.delta_weight()));
  set_merged(name, false);
}

torch::nn::AnyModule LoKrLinearImpl::unwrap() { return unwrap_base(); }

void LoKrLinearImpl::describe(std::ostream& stream, const LoKrLinearAdapterImpl& adapter) const {
  stream << "r=" << adapter.options().r() << ", alpha=" << adapter.options().alpha();
}

void LoKrLinearImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoKrLinear"); }

template class AdapterSetLayer<LoKrLinearAdapterImpl>;

}  // namespace d9d::peft
