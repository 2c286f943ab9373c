#pragma once

#include <d9d/nn/linear.h>

#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/linear.h>

#include <memory>

namespace d9d::peft {

/// The linear layer an adapter layer wraps, as its child `base`: a
/// `d9d::nn::Linear` (calls made through any holder of it are routed to the
/// wrapper) or a `torch::nn::Linear` held by a `Sequential`, `ModuleList` or
/// `ModuleDict`. Mixed into the linear wrappers of every method
/// (`LoRALinearImpl`, `IA3LinearImpl`).
class WrappedLinear {
 public:
  /// Exactly one is set.
  std::shared_ptr<d9d::nn::LinearImpl> d9d_base;
  std::shared_ptr<torch::nn::LinearImpl> torch_base;

  std::shared_ptr<torch::nn::Module> base() const;
  const at::Tensor& base_weight() const;
  /// Undefined for a layer without bias.
  const at::Tensor& base_bias() const;

 protected:
  WrappedLinear(std::shared_ptr<d9d::nn::LinearImpl> base, torch::nn::Module& wrapper);
  WrappedLinear(std::shared_ptr<torch::nn::LinearImpl> base, torch::nn::Module& wrapper);
  /// The base, its calls no longer routed to the wrapper (`AdapterLayer::unwrap`).
  torch::nn::AnyModule unwrap_base();
};

}  // namespace d9d::peft
