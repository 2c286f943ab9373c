// The (IA)³ wrapper around a linear layer.
#include <d9d/peft/errors.h>
#include <d9d/peft/ia3/linear.h>
#include <d9d/peft/ia3/math.h>

#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/linear.h>

namespace d9d::peft {

IA3LinearImpl::IA3LinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const IA3Parameters& options,
                             const std::string& adapter_name)
    : IA3LayerImpl(options.feedforward()), WrappedLinear(std::move(base), *this) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

IA3LinearImpl::IA3LinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const IA3Parameters& options,
                             const std::string& adapter_name)
    : IA3LayerImpl(options.feedforward()), WrappedLinear(std::move(base), *this) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

std::vector<int64_t> IA3LinearImpl::vector_shape() const {
  const auto& w = base_weight();
  return feedforward_ ? std::vector<int64_t>{1, w.size(1)} : std::vector<int64_t>{w.size(0), 1};
}

at::Tensor IA3LinearImpl::forward(const at::Tensor& input) {
  const at::Tensor& weight = base_weight();
  const at::Tensor& bias = base_bias();
  const at::Tensor scaling = active_scaling();
  if (!scaling.defined()) return torch::nn::functional::linear(input, weight, bias);
  const at::Tensor l = scaling.flatten();
  if (feedforward_) {
    // PEFT: (x in the adapter's dtype * l), back in the input's dtype, through the base.
    return torch::nn::functional::linear((input.to(l.scalar_type()) * l).to(input.scalar_type()), weight, bias);
  }
  const at::Tensor out = torch::nn::functional::linear(input, weight, bias);
  return (out * l).to(out.scalar_type());
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

void IA3LinearImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::IA3Linear"); }

}  // namespace d9d::peft
