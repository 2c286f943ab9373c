#pragma once

#include <d9d/model_state/mapper/mapper.h>

namespace torch::nn {
class Module;
}

namespace d9d::model_state {

/// The state keys of a module: its parameters, then its buffers, recursively
/// (the keys `torch::save` and Python's `state_dict()` use).
KeySet module_state_keys(const torch::nn::Module& module);

/// The module's own state dict (tensors shared with the module, not copied).
StateDict module_state_dict(const torch::nn::Module& module);

/// An `Identity` for every state key of `module`: a checkpoint whose keys
/// already match the model loads through it unchanged.
MapperPtr identity_mapper_from_module(const torch::nn::Module& module);

}  // namespace d9d::model_state
