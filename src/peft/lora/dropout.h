#pragma once

// LoRA's dropout on the CPU: inverted dropout of a float tensor as an autograd
// function that stores no mask (backward regenerates it from a seed).

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>

namespace d9d::peft::lora {

/// Inverted dropout of a float CPU tensor: forward writes the dropped input
/// in one pass (no mask tensor), backward regenerates the mask from the saved
/// seed. LibTorch's CPU `bernoulli_` costs several times the LoRA path itself.
/// `apply(x, p, keep)`: kept elements are multiplied by `keep`.
struct CpuDropout : public torch::autograd::Function<CpuDropout> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, double p, double keep);
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads);
};

/// Whether `CpuDropout` handles `x` (a float32 CPU tensor).
inline bool cpu_dropout_applies(const at::Tensor& x) { return x.device().is_cpu() && x.scalar_type() == at::kFloat; }

}  // namespace d9d::peft::lora
