// The LoHa wrapper around a linear layer.
#include <d9d/peft/loha/linear.h>

#include <torch/nn/functional/linear.h>

namespace d9d::peft {

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

at::Tensor LoHaLinearImpl::base_forward(const at::Tensor& input) const {
  return torch::nn::functional::linear(input, base_weight(), base_bias());
}

at::Tensor LoHaLinearImpl::delta_forward(const at::Tensor& input, const at::Tensor& delta) const {
  return torch::nn::functional::linear(input, delta);
}

torch::nn::AnyModule LoHaLinearImpl::unwrap() { return unwrap_base(); }

void LoHaLinearImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoHaLinear"); }

}  // namespace d9d::peft
