#include <d9d/nn/linear.h>

#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>

#include <cmath>

namespace d9d::nn {

std::shared_ptr<LayerOverride> Adaptable::override_target() const {
  if (!has_override_) return nullptr;
  auto target = override_.lock();
  TORCH_CHECK(target != nullptr,
              "d9d::nn layer: the PEFT wrapper that held this layer was removed from the module tree "
              "without merge_peft(). Merge the method (d9d::peft::merge_peft) before dropping its "
              "wrappers, or call clear_override() on the layer to use it plain.");
  return target;
}

LinearImpl::LinearImpl(const torch::nn::LinearOptions& options_) : options(options_) { reset(); }

void LinearImpl::reset() {
  weight = register_parameter("weight", torch::empty({options.out_features(), options.in_features()}));
  if (options.bias()) {
    bias = register_parameter("bias", torch::empty(options.out_features()));
  } else {
    bias = register_parameter("bias", {}, /*requires_grad=*/false);
  }
  reset_parameters();
}

void LinearImpl::reset_parameters() {
  // The same sequence of random draws as torch::nn::LinearImpl, so a seeded
  // model initialises identically with either layer.
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5));
  if (bias.defined()) {
    const auto fans = torch::nn::init::_calculate_fan_in_and_fan_out(weight);
    const double bound = 1.0 / std::sqrt(static_cast<double>(std::get<0>(fans)));
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

void LinearImpl::pretty_print(std::ostream& stream) const {
  stream << std::boolalpha << "d9d::nn::Linear(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << options.bias() << ")";
}

at::Tensor LinearImpl::forward(const at::Tensor& input) {
  if (auto target = override_target()) return target->forward(input);
  return forward_base(input);
}

at::Tensor LinearImpl::forward_base(const at::Tensor& input) const {
  return torch::nn::functional::linear(input, weight, bias);
}

}  // namespace d9d::nn
