// The OFT wrapper around a linear layer.
#include <d9d/peft/oft/linear.h>

#include <torch/nn/functional/linear.h>

namespace d9d::peft {

OFTLinearImpl::OFTLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const OFTParameters& options,
                             const std::string& adapter_name)
    : WrappedLinear(std::move(base), *this) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

OFTLinearImpl::OFTLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const OFTParameters& options,
                             const std::string& adapter_name)
    : WrappedLinear(std::move(base), *this) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

at::Tensor OFTLinearImpl::forward(const at::Tensor& input) {
  at::Tensor x = input;
  if (enabled_) {
    for (const auto& name : active_) {
      if (is_merged(name)) continue;
      const auto& a = adapter(name);
      x = oft::rotate(x.to(a.oft_R->weight.scalar_type()), a.rotation_blocks());
    }
  }
  return torch::nn::functional::linear(x.to(input.scalar_type()), base_weight(), base_bias()).to(input.scalar_type());
}

torch::nn::AnyModule OFTLinearImpl::unwrap() { return unwrap_base(); }

void OFTLinearImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::OFTLinear"); }

}  // namespace d9d::peft
