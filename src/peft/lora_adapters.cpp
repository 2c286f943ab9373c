// Several named LoRA adapters in one model: list, activate, delete, merge one,
// cast, disable for a scope.
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/adapters.h>
#include <d9d/peft/lora/layer.h>
#include <d9d/peft/module_tree.h>

#include <torch/csrc/autograd/grad_mode.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

namespace d9d::peft {

namespace {

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

void add_unique(std::vector<std::string>& to, const std::vector<std::string>& from) {
  for (const auto& s : from) {
    if (!contains(to, s)) to.push_back(s);
  }
}

/// Calls `f(entry, wrapper)` for every LoRA layer, linear or embedding.
template <typename F>
void for_each_lora_layer(const torch::nn::Module& model, F&& f) {
  for (const auto& entry : list_modules(const_cast<torch::nn::Module&>(model), /*enter_adapters=*/false)) {
    if (auto linear = std::dynamic_pointer_cast<LoRALinearImpl>(entry.module)) {
      f(entry, *linear);
    } else if (auto embedding = std::dynamic_pointer_cast<LoRAEmbeddingImpl>(entry.module)) {
      f(entry, *embedding);
    }
  }
}

std::string quoted_list(const std::vector<std::string>& names) {
  if (names.empty()) return "none";
  return "\"" + fmt::format("{}", fmt::join(names, "\", \"")) + "\"";
}

void require_known(const torch::nn::Module& model, const std::string& name, const char* what) {
  const auto names = lora_adapter_names(model);
  if (!contains(names, name)) {
    throw PeftError(fmt::format("{}: the model has no LoRA adapter \"{}\"; its adapters: {}", what, name,
                                quoted_list(names)));
  }
}

/// Puts the base layer of an emptied wrapper back where the wrapper hangs.
void unwrap(const ModuleEntry& entry) {
  if (auto linear = std::dynamic_pointer_cast<LoRALinearImpl>(entry.module)) {
    if (linear->d9d_base) {
      linear->d9d_base->clear_override();
      replace_child(*entry.parent, entry.child_name, torch::nn::AnyModule(linear->d9d_base));
    } else {
      replace_child(*entry.parent, entry.child_name, torch::nn::AnyModule(linear->torch_base));
    }
  } else if (auto embedding = std::dynamic_pointer_cast<LoRAEmbeddingImpl>(entry.module)) {
    embedding->base->clear_override();
    replace_child(*entry.parent, entry.child_name, torch::nn::AnyModule(embedding->base));
  }
}

}  // namespace

std::vector<std::string> lora_adapter_names(const torch::nn::Module& model) {
  std::vector<std::string> out;
  for_each_lora_layer(model, [&](const ModuleEntry&, const auto& layer) { add_unique(out, layer.names()); });
  return out;
}

std::vector<std::string> active_lora_adapters(const torch::nn::Module& model) {
  std::vector<std::string> active;
  for_each_lora_layer(model, [&](const ModuleEntry&, const auto& layer) { add_unique(active, layer.active()); });
  // In the model's order of adapters, not the order layers were visited.
  std::vector<std::string> out;
  for (const auto& name : lora_adapter_names(model)) {
    if (contains(active, name)) out.push_back(name);
  }
  return out;
}

void set_adapter(torch::nn::Module& model, const std::vector<std::string>& names) {
  for (const auto& name : names) require_known(model, name, "set_adapter");
  for_each_lora_layer(model, [&](const ModuleEntry&, auto& layer) { layer.set_active_adapters(names); });
}

void set_adapter(torch::nn::Module& model, const std::string& name) {
  set_adapter(model, std::vector<std::string>{name});
}

void delete_adapter(torch::nn::Module& model, const std::string& name) {
  require_known(model, name, "delete_adapter");
  std::vector<std::string> active = active_lora_adapters(model);
  const bool was_active = contains(active, name);
  for_each_lora_layer(model, [&](const ModuleEntry& entry, auto& layer) {
    if (!layer.find(name)) return;
    layer.delete_adapter(name);
    if (layer.entries().empty()) unwrap(entry);
  });
  if (!was_active) return;
  active.erase(std::remove(active.begin(), active.end(), name), active.end());
  const auto remaining = lora_adapter_names(model);
  if (active.empty() && !remaining.empty()) active.push_back(remaining.front());
  if (!remaining.empty()) set_adapter(model, active);
}

size_t merge_lora(torch::nn::Module& model, const std::function<bool(const std::string&)>& selects,
                  const std::string& adapter_name) {
  // As PEFT's safe_merge: NaN or Inf in an adapter (a diverged run) must not
  // reach the base weights. Checked for every layer before any is merged, so a
  // refused merge leaves the model as it was.
  for_each_lora_layer(model, [&](const ModuleEntry& entry, auto& layer) {
    if (!selects(entry.name)) return;
    const auto adapter = layer.find(adapter_name);
    if (!adapter) return;
    for (const auto& p : adapter->named_parameters()) {
      const int64_t bad = p.value().numel() - at::isfinite(p.value()).sum().template item<int64_t>();
      if (bad == 0) continue;
      throw PeftError(fmt::format("merge: adapter \"{}\" of '{}' holds {} NaN or Inf value{} in {} (of {}); merging "
                                  "would write them into the base weight. Nothing was merged; fix or retrain the "
                                  "adapter, or delete it (delete_adapter)",
                                  adapter_name, entry.name, bad, bad == 1 ? "" : "s", p.key(), p.value().numel()));
    }
  });
  size_t merged = 0;
  for_each_lora_layer(model, [&](const ModuleEntry& entry, auto& layer) {
    if (!selects(entry.name) || !layer.find(adapter_name)) return;
    layer.merge_into_base(adapter_name);
    layer.delete_adapter(adapter_name);
    if (layer.entries().empty()) unwrap(entry);
    ++merged;
  });
  return merged;
}

void cast_adapter_dtype(torch::nn::Module& model, const std::string& name, c10::ScalarType dtype) {
  require_known(model, name, "cast_adapter_dtype");
  if (!c10::isFloatingType(dtype)) {
    throw PeftError(fmt::format("cast_adapter_dtype(\"{}\"): {} is not a floating-point dtype", name,
                                c10::toString(dtype)));
  }
  for_each_lora_layer(model, [&](const ModuleEntry&, auto& layer) {
    if (auto adapter = layer.find(name)) adapter->to(dtype);
  });
}

DisableAdapters::DisableAdapters(torch::nn::Module& model) {
  for_each_lora_layer(model, [&](const ModuleEntry& entry, auto& layer) {
    saved_.emplace_back(entry.module, layer.enabled());
    layer.set_adapters_enabled(false);
  });
}

DisableAdapters::~DisableAdapters() {
  for (auto& [module, enabled] : saved_) {
    if (auto* linear = module->as<LoRALinearImpl>()) linear->set_adapters_enabled(enabled);
    else if (auto* embedding = module->as<LoRAEmbeddingImpl>()) embedding->set_adapters_enabled(enabled);
  }
}

}  // namespace d9d::peft
