#pragma once

#include <d9d/model_state/mapper/mapper.h>
#include <d9d/peft/base.h>

#include <torch/nn/pimpl.h>

namespace d9d::peft {

/// Applies `method` to `module` and freezes everything it does not train.
///
/// 1. `method.inject(module)` changes the structure (or throws, leaving the
///    module as it was);
/// 2. every parameter is frozen, then the ones the method returned are set to
///    `requires_grad`;
/// 3. returns a mapper that loads a complete standard checkpoint of the
///    original model into the modified one: the method's mappers plus an
///    `Identity` for every untouched key.
///
/// Throws `PeftError` if the method trains no parameter.
model_state::MapperPtr inject_peft_and_freeze(PeftMethodBase& method, torch::nn::Module& module);

template <typename Impl>
model_state::MapperPtr inject_peft_and_freeze(PeftMethodBase& method, torch::nn::ModuleHolder<Impl>& module) {
  return inject_peft_and_freeze(method, *module);
}

/// Folds the method's trained adapters into the base weights and restores the
/// original structure, keys and forward.
void merge_peft(PeftMethodBase& method, torch::nn::Module& module);

template <typename Impl>
void merge_peft(PeftMethodBase& method, torch::nn::ModuleHolder<Impl>& module) {
  merge_peft(method, *module);
}

/// The parameters of `module` that require gradients (for the optimizer).
std::vector<at::Tensor> trainable_parameters(const torch::nn::Module& module);

}  // namespace d9d::peft
