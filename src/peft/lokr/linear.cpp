// The LoKr wrapper around a linear layer.
#include <d9d/peft/lokr/linear.h>

#include <torch/nn/functional/linear.h>

namespace d9d::peft {

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

at::Tensor LoKrLinearImpl::base_forward(const at::Tensor& input) const {
  return torch::nn::functional::linear(input, base_weight(), base_bias());
}

at::Tensor LoKrLinearImpl::delta_forward(const at::Tensor& input, const at::Tensor& delta) const {
  return torch::nn::functional::linear(input, delta);
}

torch::nn::AnyModule LoKrLinearImpl::unwrap() { return unwrap_base(); }

void LoKrLinearImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoKrLinear"); }

}  // namespace d9d::peft
