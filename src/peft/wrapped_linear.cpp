#include <d9d/peft/errors.h>
#include <d9d/peft/wrapped_linear.h>

namespace d9d::peft {

WrappedLinear::WrappedLinear(std::shared_ptr<d9d::nn::LinearImpl> base, torch::nn::Module& wrapper)
    : d9d_base(std::move(base)) {
  if (!d9d_base) throw PeftError(wrapper.name() + ": the base layer is null");
  wrapper.register_module("base", d9d_base);
}

WrappedLinear::WrappedLinear(std::shared_ptr<torch::nn::LinearImpl> base, torch::nn::Module& wrapper)
    : torch_base(std::move(base)) {
  if (!torch_base) throw PeftError(wrapper.name() + ": the base layer is null");
  wrapper.register_module("base", torch_base);
}

std::shared_ptr<torch::nn::Module> WrappedLinear::base() const {
  if (d9d_base) return d9d_base;
  return torch_base;
}

const at::Tensor& WrappedLinear::base_weight() const { return d9d_base ? d9d_base->weight : torch_base->weight; }

const at::Tensor& WrappedLinear::base_bias() const { return d9d_base ? d9d_base->bias : torch_base->bias; }

torch::nn::AnyModule WrappedLinear::unwrap_base() {
  if (d9d_base) {
    d9d_base->clear_override();
    return torch::nn::AnyModule(d9d_base);
  }
  return torch::nn::AnyModule(torch_base);
}

}  // namespace d9d::peft
