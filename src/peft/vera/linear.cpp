// The VeRA wrapper around a linear layer.
#include <d9d/detail/torch_compat.h>
#include <d9d/peft/detail/adapter_set_impl.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/vera/linear.h>
#include <d9d/peft/vera/math.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/dropout.h>
#include <torch/nn/functional/linear.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace d9d::peft {

namespace {

const char* const kVectors[] = {"vera_lambda_b", "vera_lambda_d"};
const char* const kProjections[] = {"vera_A", "vera_B"};

std::string shape_str(at::IntArrayRef sizes) { return fmt::format("[{}]", fmt::join(sizes, ", ")); }

}  // namespace

VeraLinearAdapterImpl::VeraLinearAdapterImpl(int64_t in_features, int64_t out_features,
                                             const VeraParameters& options, const at::TensorOptions& like)
    : options_(options), in_features_(in_features) {
  const int64_t r = options.r();
  torch::NoGradGuard no_grad;
  at::Tensor a = options.vera_A(), b = options.vera_B();
  if (a.defined() != b.defined()) throw PeftError("VeRA: give both projections vera_A and vera_B, or neither");
  if (!a.defined()) {
    std::tie(a, b) = vera::projections(r, out_features, in_features, options.projection_prng_key());
    a = a.to(like);
    b = b.to(like);
  } else if (a.dim() != 2 || b.dim() != 2 || a.size(0) != r || b.size(1) != r || a.size(1) < in_features ||
             b.size(0) < out_features) {
    throw PeftError(fmt::format("VeRA: the projections vera_A {} and vera_B {} do not fit a layer [{}, {}] of rank {} "
                                "(they must be [{}, >= {}] and [>= {}, {}]: drawn for the largest adapted layer)",
                                shape_str(a.sizes()), shape_str(b.sizes()), out_features, in_features, r, r,
                                in_features, out_features, r));
  }
  // PEFT's update_layer: ones and randn (drawn from the default generator
  // whatever init_weights says), then reset to zeros and d_initial.
  at::Tensor lambda_b = at::ones({out_features}, at::kFloat);
  at::Tensor lambda_d = at::randn({r}, at::kFloat);
  if (options.init_weights()) {
    lambda_b.zero_();
    lambda_d.fill_(options.d_initial());
  }
  vera_lambda_b = register_parameter("vera_lambda_b", lambda_b.to(like));
  vera_lambda_d = register_parameter("vera_lambda_d", lambda_d.to(like));
  // Not registered here: the layer registers every adapter's projections as PEFT does (`vera_A.<adapter>`).
  vera_A = a;
  vera_B = b;
  // The options keep the settings, not the tensors: the buffers are the projections.
  options_.vera_A(at::Tensor()).vera_B(at::Tensor());
}

at::Tensor VeraLinearAdapterImpl::delta_weight() const {
  return vera::delta_weight(vera_A, vera_B, vera_lambda_b, vera_lambda_d, in_features_);
}

void VeraLinearAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::VeraLinearAdapter(r=" << options_.r() << ", projection_prng_key="
         << options_.projection_prng_key() << ")";
}

VeraLinearImpl::VeraLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const VeraParameters& options,
                               const std::string& adapter_name)
    : WrappedLinear(std::move(base), *this) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

VeraLinearImpl::VeraLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const VeraParameters& options,
                               const std::string& adapter_name)
    : WrappedLinear(std::move(base), *this) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void VeraLinearImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  const auto* o = dynamic_cast<const VeraParameters*>(&options);
  if (!o) throw PeftError("add_adapter: a VeRA layer takes VeraParameters as the adapter's options");
  o->validate("add_adapter(\"" + name + "\")");
  const auto& w = base_weight();
  append(name, std::make_shared<VeraLinearAdapterImpl>(w.size(1), w.size(0), *o, w.options()));
}

void VeraLinearImpl::relayout() {
  clear_further_adapters();
  at::Tensor* vectors[] = {&vera_lambda_b, &vera_lambda_d};
  for (int i = 0; i < 2; ++i) {
    d9d::detail::torch_compat::unregister_parameter(*this, kVectors[i]);
    *vectors[i] = at::Tensor();
    if (named_children().contains(kProjections[i])) unregister_module(kProjections[i]);
  }
  vera_A = vera_B = at::Tensor();
  if (entries_.empty()) return;
  const auto& a = *entries_.front().second;
  const at::Tensor* from_vectors[] = {&a.vera_lambda_b, &a.vera_lambda_d};
  for (int i = 0; i < 2; ++i) {
    *vectors[i] = register_parameter(kVectors[i], *from_vectors[i], from_vectors[i]->requires_grad());
  }
  vera_A = a.vera_A;
  vera_B = a.vera_B;
  // PEFT's layout: a child `vera_A` (and `vera_B`) holding each adapter's
  // projections as a buffer named after the adapter. The tensors are the
  // adapter's own, shared with the model's other layers, so `to()` moves
  // them for all (LibTorch changes a tensor's data in place).
  for (int i = 0; i < 2; ++i) {
    auto holder = std::make_shared<torch::nn::Module>("d9d::peft::VeraProjections");
    for (const auto& [name, adapter] : entries_) holder->register_buffer(name, i == 0 ? adapter->vera_A : adapter->vera_B);
    register_module(kProjections[i], holder);
  }
  register_further_adapters();
}

at::Tensor VeraLinearImpl::forward(const at::Tensor& input) {
  at::Tensor result = torch::nn::functional::linear(input, base_weight(), base_bias());
  if (!enabled_) return result;
  const auto result_dtype = result.scalar_type();
  for (const auto& name : active_) {
    if (is_merged(name)) continue;
    const auto& a = adapter(name);
    const auto dtype = a.vera_lambda_d.scalar_type();
    at::Tensor x = input.to(dtype);
    if (is_training() && a.options().vera_dropout() > 0) {
      x = torch::nn::functional::dropout(x, torch::nn::functional::DropoutFuncOptions()
                                                .p(a.options().vera_dropout())
                                                .training(true));
    }
    result = result + vera::forward_term(x, a.vera_A.to(dtype), a.vera_B.to(dtype), a.vera_lambda_b, a.vera_lambda_d);
  }
  return result.to(result_dtype).to(input.scalar_type());
}

at::Tensor VeraLinearImpl::delta_weight(const std::string& name) const { return adapter(name).delta_weight(); }

void VeraLinearImpl::merge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = require_merged(name, false, "merge_adapter");
  base_weight().copy_(vera::merged_weight(base_weight(), a.delta_weight()));
  set_merged(name, true);
}

void VeraLinearImpl::unmerge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = require_merged(name, true, "unmerge_adapter");
  base_weight().copy_(vera::merged_weight(base_weight(), -a.delta_weight()));
  set_merged(name, false);
}

torch::nn::AnyModule VeraLinearImpl::unwrap() { return unwrap_base(); }

std::vector<std::string> VeraLinearImpl::fresh_state_keys() const {
  std::vector<std::string> keys = AdapterSetLayer::fresh_state_keys();
  for (const auto& entry : entries_) {
    for (const char* projection : kProjections) keys.push_back(std::string(projection) + "." + entry.first);
  }
  return keys;
}

std::vector<SharedAdapterState> VeraLinearImpl::shared_adapter_state(const std::string& name) const {
  const auto& a = adapter(name);
  const bool saved = a.options().save_projection();
  return {{"vera_A", a.vera_A, saved}, {"vera_B", a.vera_B, saved}};
}

void VeraLinearImpl::describe(std::ostream& stream, const VeraLinearAdapterImpl& adapter) const {
  stream << "r=" << adapter.options().r() << ", projection_prng_key=" << adapter.options().projection_prng_key();
}

void VeraLinearImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::VeraLinear"); }

template class AdapterSetLayer<VeraLinearAdapterImpl>;

}  // namespace d9d::peft
