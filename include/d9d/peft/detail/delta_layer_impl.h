#pragma once

// The definitions of DeltaLayer and DeltaLinear, for the sources that
// instantiate them (one per method: `template class DeltaLayer<MyAdapterImpl>;`).

#include <d9d/peft/delta_layer.h>
#include <d9d/peft/detail/adapter_set_impl.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/linear.h>

namespace d9d::peft {

template <typename Adapter>
at::Tensor DeltaLayer<Adapter>::forward(const at::Tensor& input) {
  at::Tensor result = base_forward(input);
  if (!this->enabled_) return result;
  for (const auto& name : this->active_) {
    if (this->is_merged(name)) continue;
    const Adapter& a = this->adapter(name);
    // PEFT draws torch.rand(1) for every adapter in training, whatever module_dropout is.
    if (this->is_training() && !(at::rand({1}).item<double>() > a.options().module_dropout())) continue;
    at::Tensor delta = a.delta_weight();
    if (this->is_training()) delta = a.rank_dropped(delta);
    result = result + delta_forward(input.to(delta.scalar_type()), delta);
  }
  return result.to(input.scalar_type());
}

template <typename Adapter>
at::Tensor DeltaLayer<Adapter>::delta_weight(const std::string& name) const {
  return this->adapter(name).delta_weight();
}

template <typename Adapter>
void DeltaLayer<Adapter>::merge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const Adapter& a = this->require_merged(name, false, "merge_adapter");
  adapted_weight().copy_(added_delta(adapted_weight(), a.delta_weight()));
  this->set_merged(name, true);
}

template <typename Adapter>
void DeltaLayer<Adapter>::unmerge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const Adapter& a = this->require_merged(name, true, "unmerge_adapter");
  adapted_weight().copy_(subtracted_delta(adapted_weight(), a.delta_weight()));
  this->set_merged(name, false);
}

template <typename Layer>
at::Tensor DeltaLinear<Layer>::base_forward(const at::Tensor& input) const {
  return torch::nn::functional::linear(input, this->base_weight(), this->base_bias());
}

template <typename Layer>
at::Tensor DeltaLinear<Layer>::delta_forward(const at::Tensor& input, const at::Tensor& delta) const {
  return torch::nn::functional::linear(input, delta);
}

}  // namespace d9d::peft
