// Several named adapters in one model, through the AdapterLayer interface.
#include <d9d/peft/adapters.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/module_tree.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/module.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "safe_merge.h"

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

std::string quoted_list(const std::vector<std::string>& names) {
  if (names.empty()) return "none";
  return fmt::format("\"{}\"", fmt::join(names, "\", \""));
}

void require_known(const torch::nn::Module& model, const std::string& name, const char* what) {
  const auto names = adapter_names(model);
  if (!contains(names, name)) {
    throw PeftError(fmt::format("{}: the model has no adapter \"{}\"; its adapters: {}", what, name,
                                quoted_list(names)));
  }
}

/// Puts the base layer of an emptied adapter layer back where the layer hangs.
void unwrap_if_empty(const AdapterLayerEntry& entry) {
  if (entry.layer->adapter_names().empty()) replace_child(*entry.parent, entry.child_name, entry.layer->unwrap());
}

}  // namespace

std::vector<AdapterLayerEntry> adapter_layers(const torch::nn::Module& model) {
  std::vector<AdapterLayerEntry> out;
  for (const auto& entry : list_modules(const_cast<torch::nn::Module&>(model), /*enter_adapters=*/false)) {
    if (auto* layer = dynamic_cast<AdapterLayer*>(entry.module.get())) {
      out.push_back({entry.name, entry.module, layer, entry.parent, entry.child_name});
    }
  }
  return out;
}

std::vector<std::string> adapter_names(const torch::nn::Module& model) {
  std::vector<std::string> out;
  for (const auto& entry : adapter_layers(model)) add_unique(out, entry.layer->adapter_names());
  return out;
}

std::vector<std::string> active_adapters(const torch::nn::Module& model) {
  std::vector<std::string> active;
  const auto layers = adapter_layers(model);
  for (const auto& entry : layers) add_unique(active, entry.layer->active_adapters());
  // In the model's order of adapters, not the order layers were visited.
  std::vector<std::string> out;
  for (const auto& name : adapter_names(model)) {
    if (contains(active, name)) out.push_back(name);
  }
  return out;
}

void set_adapter(torch::nn::Module& model, const std::vector<std::string>& names) {
  for (const auto& name : names) require_known(model, name, "set_adapter");
  for (const auto& entry : adapter_layers(model)) entry.layer->set_active_adapters(names);
}

void set_adapter(torch::nn::Module& model, const std::string& name) {
  set_adapter(model, std::vector<std::string>{name});
}

void delete_adapter(torch::nn::Module& model, const std::string& name) {
  require_known(model, name, "delete_adapter");
  std::vector<std::string> active = active_adapters(model);
  const bool was_active = contains(active, name);
  for (const auto& entry : adapter_layers(model)) {
    if (!entry.layer->has_adapter(name)) continue;
    entry.layer->delete_adapter(name);
    unwrap_if_empty(entry);
  }
  if (!was_active) return;
  active.erase(std::remove(active.begin(), active.end(), name), active.end());
  const auto remaining = adapter_names(model);
  if (active.empty() && !remaining.empty()) active.push_back(remaining.front());
  if (!remaining.empty()) set_adapter(model, active);
}

namespace {

thread_local bool t_allow_non_finite = false;

}  // namespace

AllowNonFiniteMerge::AllowNonFiniteMerge() : previous_(t_allow_non_finite) { t_allow_non_finite = true; }
AllowNonFiniteMerge::~AllowNonFiniteMerge() { t_allow_non_finite = previous_; }
bool AllowNonFiniteMerge::enabled() { return t_allow_non_finite; }

size_t merge_adapter(torch::nn::Module& model, const std::function<bool(const std::string&)>& selects,
                     const std::string& adapter_name) {
  const auto layers = adapter_layers(model);
  // As PEFT's safe_merge: NaN or Inf in an adapter (a diverged run), or a
  // merge that overflows, must not reach the base weights. Checked for every
  // layer before any is merged, so a refused merge leaves the model as it was.
  for (const auto& entry : layers) {
    if (t_allow_non_finite) break;
    if (!selects(entry.name) || !entry.layer->has_adapter(adapter_name)) continue;
    detail::refuse_non_finite_adapter(entry, adapter_name, "merge");
    if (!contains(entry.layer->merged_adapters(), adapter_name)) {
      detail::check_merge_stays_finite(entry, {adapter_name}, "merge");
    }
  }
  size_t merged = 0;
  for (const auto& entry : layers) {
    if (!selects(entry.name) || !entry.layer->has_adapter(adapter_name)) continue;
    const auto already = entry.layer->merged_adapters();
    if (!contains(already, adapter_name)) entry.layer->merge_adapter(adapter_name);
    entry.layer->delete_adapter(adapter_name);
    unwrap_if_empty(entry);
    ++merged;
  }
  return merged;
}

void cast_adapter_dtype(torch::nn::Module& model, const std::string& name, c10::ScalarType dtype) {
  require_known(model, name, "cast_adapter_dtype");
  if (!c10::isFloatingType(dtype)) {
    throw PeftError(fmt::format("cast_adapter_dtype(\"{}\"): {} is not a floating-point dtype", name,
                                c10::toString(dtype)));
  }
  for (const auto& entry : adapter_layers(model)) {
    if (entry.layer->has_adapter(name)) entry.layer->adapter_module(name)->to(dtype);
  }
}

void after_base_weights_loaded(torch::nn::Module& model) {
  for (const auto& entry : adapter_layers(model)) entry.layer->after_base_loaded({});
}

DisableAdapters::DisableAdapters(torch::nn::Module& model) {
  const auto layers = adapter_layers(model);
  for (const auto& entry : layers) {
    const auto merged = entry.layer->merged_adapters();
    if (!merged.empty()) {
      throw PeftError(fmt::format("DisableAdapters: '{}' has adapter \"{}\" merged into its base weight, so it cannot "
                                  "compute without it; unmerge it first (AdapterLayer::unmerge_adapter)",
                                  entry.name, merged.front()));
    }
  }
  for (const auto& entry : layers) {
    saved_.emplace_back(entry.module, entry.layer->adapters_enabled());
    entry.layer->set_adapters_enabled(false);
  }
}

DisableAdapters::~DisableAdapters() {
  for (auto& [module, enabled] : saved_) {
    if (auto* layer = dynamic_cast<AdapterLayer*>(module.get())) layer->set_adapters_enabled(enabled);
  }
}

}  // namespace d9d::peft
