#pragma once

// The state an adapter's layers share (VeRA's projections), as adapter files
// hold it: once per adapter, under `base_model.<key>`.

#include <d9d/peft/shared_state.h>

#include <map>
#include <string>
#include <vector>

namespace torch::nn {
class Module;
}

namespace d9d::peft::hf::detail {

/// One file key's shared state: every distinct tensor the layers hold under
/// it (normally one: the same tensor in each layer).
struct SharedEntry {
  std::vector<at::Tensor> tensors;
  bool in_files = true;
};

/// What the layers holding adapter `adapter` share (`SharesAdapterState`), by
/// file key (`base_model.vera_A`). `PeftError` naming two layers whose tensors
/// under one key differ: a file holds the state once.
std::map<std::string, SharedEntry> shared_state(const torch::nn::Module& module, const std::string& adapter);

}  // namespace d9d::peft::hf::detail
