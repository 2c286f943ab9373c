#pragma once

#include <d9d/nn/adaptable.h>

#include <torch/nn/cloneable.h>
#include <torch/nn/options/linear.h>
#include <torch/nn/pimpl.h>

#include <ostream>

namespace d9d::nn {

/// A drop-in replacement for `torch::nn::Linear` that PEFT methods can adapt.
///
/// Same options type, parameter names (`weight`, `bias`), initialisation and
/// numerics as `torch::nn::Linear`. The difference: when a PEFT method wraps
/// it, calls made through any holder of the layer (a typed member, a
/// `Sequential`, a `ModuleList`) reach the wrapper.
///
/// ```
/// struct AttentionImpl : torch::nn::Module {
///   AttentionImpl(int64_t d) : q_proj(register_module("q_proj", d9d::nn::Linear(d, d))) {}
///   torch::Tensor forward(const torch::Tensor& x) { return q_proj(x); }
///   d9d::nn::Linear q_proj;
/// };
/// ```
class LinearImpl : public torch::nn::Cloneable<LinearImpl>, public Adaptable {
 public:
  LinearImpl(int64_t in_features, int64_t out_features)
      : LinearImpl(torch::nn::LinearOptions(in_features, out_features)) {}
  /// Throws `d9d::peft::ConfigError` for a negative size.
  explicit LinearImpl(const torch::nn::LinearOptions& options);

  void reset() override;
  /// Re-initialises `weight` and `bias` exactly as `torch::nn::Linear` does.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  /// `input @ weight^T + bias`, or the PEFT wrapper's forward if one holds
  /// this layer.
  at::Tensor forward(const at::Tensor& input);
  /// The plain linear transform, never redirected. Wrappers call this.
  at::Tensor forward_base(const at::Tensor& input) const;

  torch::nn::LinearOptions options;
  at::Tensor weight;
  /// Undefined when `options.bias()` is false.
  at::Tensor bias;
};

TORCH_MODULE(Linear);

}  // namespace d9d::nn
