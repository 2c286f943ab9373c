#include <d9d/nn/linear.h>
#include <d9d/peft/errors.h>

#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>

#include <cmath>
#include <string>

namespace d9d::nn {

std::shared_ptr<LayerOverride> Adaptable::override_target() const {
  if (!has_override_) return nullptr;
  auto target = override_.lock();
  if (!target) {
    throw d9d::peft::PeftError(
        "d9d::nn layer: the PEFT wrapper that held this layer was removed from the module tree "
        "without merge_peft(). Merge the method (d9d::peft::merge_peft) before dropping its "
        "wrappers, or call clear_override() on the layer to use it plain.");
  }
  return target;
}

LinearImpl::LinearImpl(const torch::nn::LinearOptions& options_) : options(options_) { reset(); }

void LinearImpl::reset() {
  for (const auto& [field, size] : {std::pair<const char*, int64_t>{"in_features", options.in_features()},
                                    {"out_features", options.out_features()}}) {
    if (size < 0) {
      throw d9d::peft::ConfigError(std::string("LinearOptions.") + field,
                                   "must be >= 0, got " + std::to_string(size) + " (d9d::nn::Linear)");
    }
  }
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
  // Zero elements: a no-op, as in Python (LibTorch's kaiming_uniform_
  // would throw on the infinite bound of a zero fan-in).
  if (weight.numel() > 0) torch::nn::init::kaiming_uniform_(weight, std::sqrt(5));
  if (bias.defined()) {
    const auto fans = torch::nn::init::_calculate_fan_in_and_fan_out(weight);
    // Python's bound (0 without inputs); 1/sqrt(0) would make uniform_ throw.
    const int64_t fan_in = std::get<0>(fans);
    const double bound = fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
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
