#include <d9d/peft/adapter_layer.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/module_tree.h>

#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>

#include <fmt/format.h>

#include <unordered_map>

namespace d9d::peft {

namespace {

/// Every (path, module) pair, shared modules once per path.
void collect(torch::nn::Module& parent, const std::string& prefix, bool enter_adapters,
             std::vector<ModuleEntry>& out) {
  for (const auto& child : parent.named_children()) {
    const auto& module = child.value();
    if (!module) continue;
    const bool is_adapter = dynamic_cast<const AdapterLayer*>(module.get()) != nullptr;
    const std::string name = prefix.empty() ? child.key() : prefix + "." + child.key();
    out.push_back(ModuleEntry{name, module, &parent, child.key(), {}});
    if (is_adapter && !enter_adapters) continue;
    collect(*module, name, enter_adapters, out);
  }
}

size_t child_index(const torch::nn::Module& parent, const std::string& child_name) {
  const auto keys = parent.named_children().keys();
  for (size_t i = 0; i < keys.size(); ++i) {
    if (keys[i] == child_name) return i;
  }
  throw PeftError(fmt::format("replace_child: {} has no child named '{}'", type_name(parent), child_name));
}

}  // namespace

std::vector<ModuleEntry> list_modules(torch::nn::Module& root, bool enter_adapters) {
  std::vector<ModuleEntry> all;
  collect(root, "", enter_adapters, all);
  std::vector<ModuleEntry> out;
  std::unordered_map<const torch::nn::Module*, size_t> first;  // module -> index in out
  for (auto& entry : all) {
    auto [it, inserted] = first.emplace(entry.module.get(), out.size());
    if (inserted) {
      out.push_back(std::move(entry));
    } else {
      out[it->second].aliases.push_back(entry.name);
    }
  }
  return out;
}

bool is_synced_container(const torch::nn::Module& module) {
  return dynamic_cast<const torch::nn::SequentialImpl*>(&module) ||
         dynamic_cast<const torch::nn::ModuleListImpl*>(&module) ||
         dynamic_cast<const torch::nn::ModuleDictImpl*>(&module);
}

void replace_child(torch::nn::Module& parent, const std::string& child_name,
                   const torch::nn::AnyModule& replacement) {
  const auto module = replacement.ptr();
  if (auto* sequential = dynamic_cast<torch::nn::SequentialImpl*>(&parent)) {
    const size_t index = child_index(parent, child_name);
    *(sequential->begin() + static_cast<std::ptrdiff_t>(index)) = replacement;
    parent.replace_module(child_name, module);
  } else if (auto* list = dynamic_cast<torch::nn::ModuleListImpl*>(&parent)) {
    const size_t index = child_index(parent, child_name);
    *(list->begin() + static_cast<std::ptrdiff_t>(index)) = module;
    parent.replace_module(child_name, module);
  } else if (auto* dict = dynamic_cast<torch::nn::ModuleDictImpl*>(&parent)) {
    dict->update(std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>{{child_name, module}});
  } else {
    child_index(parent, child_name);  // throws if absent
    parent.replace_module(child_name, module);
  }
}

std::string type_name(const torch::nn::Module& module) { return module.name(); }

}  // namespace d9d::peft
