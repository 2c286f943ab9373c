#pragma once

// The definitions of DeltaLayer and DeltaLinear, for the sources that
// instantiate them (one per method: `template class DeltaLayer<MyAdapterImpl>;`).

#include <d9d/peft/delta_layer.h>
#include <d9d/peft/detail/adapter_set_impl.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/linear.h>

#include <utility>
#include <vector>

namespace d9d::peft {

template <typename Adapter>
at::Tensor DeltaLayer<Adapter>::forward(const at::Tensor& input) {
  if (!this->enabled_) return base_forward(input);
  std::vector<at::Tensor> deltas;  // the adapters taking part in this call, in PEFT's order
  for (const auto& name : this->active_) {
    if (this->is_merged(name)) continue;
    const Adapter& a = this->adapter(name);
    // PEFT draws torch.rand(1) for every adapter in training, whatever module_dropout is.
    if (this->is_training() && !(at::rand({1}).item<double>() > a.options().module_dropout())) continue;
    at::Tensor delta = a.delta_weight();
    if (this->is_training()) delta = a.rank_dropped(delta);
    deltas.push_back(std::move(delta));
  }
  if (deltas.empty()) return base_forward(input);
  const at::Tensor& weight = adapted_weight();
  bool one_dtype = input.scalar_type() == weight.scalar_type();
  for (const auto& d : deltas) one_dtype = one_dtype && d.scalar_type() == weight.scalar_type();
  if (one_dtype) {
    at::Tensor folded = weight + deltas.front();
    for (size_t i = 1; i < deltas.size(); ++i) folded = folded + deltas[i];
    return weighted_forward(input, folded);
  }
  at::Tensor result = base_forward(input);
  for (const auto& d : deltas) result = result + delta_forward(input.to(d.scalar_type()), d);
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

template <typename Layer>
at::Tensor DeltaLinear<Layer>::weighted_forward(const at::Tensor& input, const at::Tensor& weight) const {
  return torch::nn::functional::linear(input, weight, this->base_bias());
}

}  // namespace d9d::peft
