#pragma once

#include <torch/nn/modules/container/any.h>

#include <memory>
#include <string>
#include <vector>

namespace d9d::peft {

/// One module of a tree, with where it hangs.
struct ModuleEntry {
  /// Qualified name: `layers.0.attention.q_proj` (empty for the root).
  std::string name;
  std::shared_ptr<torch::nn::Module> module;
  /// The parent (null for the root) and the name it registers this module under.
  torch::nn::Module* parent = nullptr;
  std::string child_name;
  /// The other qualified names the same module object is registered under
  /// (a shared or tied module); empty for most modules.
  std::vector<std::string> aliases;
};

/// Every module object below `root` (not the root itself) once, depth-first
/// in registration order, at the first path that reaches it; the other paths
/// are its `aliases`. With `enter_adapters` false, PEFT adapter layers are
/// listed but what is inside them is not.
std::vector<ModuleEntry> list_modules(torch::nn::Module& root, bool enter_adapters = true);

/// True for LibTorch containers whose own call list this library can keep in
/// step with the registry: `Sequential`, `ModuleList`, `ModuleDict`.
bool is_synced_container(const torch::nn::Module& module);

/// Replaces the child `child_name` of `parent` in the registry and, for the
/// containers of `is_synced_container`, in the container's call list too.
void replace_child(torch::nn::Module& parent, const std::string& child_name, const torch::nn::AnyModule& replacement);

/// The module's type for messages: `torch::nn::LinearImpl`.
std::string type_name(const torch::nn::Module& module);

}  // namespace d9d::peft
