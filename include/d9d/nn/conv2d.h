#pragma once

#include <d9d/nn/adaptable.h>

#include <torch/nn/cloneable.h>
#include <torch/nn/options/conv.h>
#include <torch/nn/pimpl.h>

#include <ostream>
#include <vector>

namespace d9d::nn {

/// A drop-in replacement for `torch::nn::Conv2d` that PEFT methods can adapt.
///
/// Same options type (`torch::nn::Conv2dOptions`), parameter names (`weight`
/// `[out, in / groups, kh, kw]`, `bias`), initialisation and numerics as
/// `torch::nn::Conv2d`, so a checkpoint of a model built with the torch layer
/// loads into one built with this. When a PEFT method wraps it, calls made
/// through any holder of the layer reach the wrapper.
///
/// ```
/// struct NetImpl : torch::nn::Module {
///   NetImpl() : conv1(register_module("conv1", d9d::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).padding(1)))) {}
///   torch::Tensor forward(const torch::Tensor& x) { return conv1(x); }
///   d9d::nn::Conv2d conv1;
/// };
/// ```
class Conv2dImpl : public torch::nn::Cloneable<Conv2dImpl>, public Adaptable {
 public:
  Conv2dImpl(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<2> kernel_size)
      : Conv2dImpl(torch::nn::Conv2dOptions(in_channels, out_channels, kernel_size)) {}
  /// Throws `d9d::peft::ConfigError` naming the field for a non-positive size,
  /// channels not divisible by `groups`, or `padding` "same" with a stride.
  explicit Conv2dImpl(torch::nn::Conv2dOptions options);

  void reset() override;
  /// Kaiming-uniform weight (a = sqrt(5)) and uniform bias, as `torch::nn::Conv2d`.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  /// The convolution, or the PEFT wrapper's forward if one holds this layer.
  at::Tensor forward(const at::Tensor& input);
  /// The plain convolution, never redirected. Wrappers call this.
  at::Tensor forward_base(const at::Tensor& input) const;
  /// This layer's convolution (stride, padding and its mode, dilation,
  /// groups) with another `weight` and `bias` (undefined: none).
  at::Tensor convolve(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias) const;

  torch::nn::Conv2dOptions options;
  at::Tensor weight;
  /// Undefined when `options.bias()` is false.
  at::Tensor bias;

 private:
  /// For a padding mode other than zeros: the explicit padding, last dimension first.
  std::vector<int64_t> reversed_padding_;
};

TORCH_MODULE(Conv2d);

}  // namespace d9d::nn
