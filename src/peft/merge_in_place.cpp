// Merging adapters into the base weights while keeping them, and unmerging.
#include <d9d/peft/adapters.h>
#include <d9d/peft/errors.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "safe_merge.h"

#include <algorithm>

namespace d9d::peft {

namespace {

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

/// The names of `names` that `layer` holds, in the order given.
std::vector<std::string> held(const AdapterLayer& layer, const std::vector<std::string>& names) {
  std::vector<std::string> out;
  for (const auto& name : names) {
    if (layer.has_adapter(name)) out.push_back(name);
  }
  return out;
}

}  // namespace

void merge_adapters_in_place(torch::nn::Module& model, const std::vector<std::string>& names) {
  const char* what = "merge_adapters_in_place";
  const auto known = adapter_names(model);
  std::vector<std::string> to_merge = names.empty() ? active_adapters(model) : names;
  if (to_merge.empty()) {
    throw PeftError(fmt::format("{}: {}; name the adapters to merge", what,
                                known.empty() ? "the model holds no adapter" : "no adapter is active"));
  }
  for (size_t i = 0; i < to_merge.size(); ++i) {
    if (!contains(known, to_merge[i])) {
      throw PeftError(fmt::format("{}: the model has no adapter \"{}\"; its adapters: \"{}\"", what, to_merge[i],
                                  fmt::join(known, "\", \"")));
    }
    if (std::find(to_merge.begin(), to_merge.begin() + static_cast<std::ptrdiff_t>(i), to_merge[i]) !=
        to_merge.begin() + static_cast<std::ptrdiff_t>(i)) {
      throw PeftError(fmt::format("{}: adapter \"{}\" is named twice", what, to_merge[i]));
    }
  }
  const auto layers = adapter_layers(model);
  for (const auto& entry : layers) {
    const auto mine = held(*entry.layer, to_merge);
    if (mine.empty()) continue;
    const auto merged = entry.layer->merged_adapters();
    for (const auto& name : mine) {
      if (contains(merged, name)) {
        throw PeftError(fmt::format("{}: adapter \"{}\" is already merged into '{}'; call unmerge_adapters first, or "
                                    "leave it out of the names to merge",
                                    what, name, entry.name));
      }
    }
    if (!entry.layer->adapters_enabled()) {
      throw PeftError(fmt::format("{}: '{}' has its adapters disabled (inside a DisableAdapters scope); a merged "
                                  "adapter cannot be disabled, so merge after the scope ends",
                                  what, entry.name));
    }
  }
  // Every layer is checked (merged aside and restored bit-exactly) before any
  // is merged, so a refusal at one layer leaves every other as it was, and
  // only one layer's copy is held at a time.
  if (!AllowNonFiniteMerge::enabled()) {
    for (const auto& entry : layers) {
      const auto mine = held(*entry.layer, to_merge);
      if (mine.empty()) continue;
      for (const auto& name : mine) detail::refuse_non_finite_adapter(entry, name, what);
      detail::check_merge_stays_finite(entry, mine, what);
    }
  }
  for (const auto& entry : layers) {
    for (const auto& name : held(*entry.layer, to_merge)) entry.layer->merge_adapter(name);
  }
}

void unmerge_adapters(torch::nn::Module& model) {
  bool any = false;
  for (const auto& entry : adapter_layers(model)) {
    const auto merged = entry.layer->merged_adapters();
    for (auto it = merged.rbegin(); it != merged.rend(); ++it) entry.layer->unmerge_adapter(*it);
    any = any || !merged.empty();
  }
  if (!any) {
    throw PeftError("unmerge_adapters: no adapter is merged into the model; merge_adapters_in_place merges adapters "
                    "so that they can be unmerged");
  }
}

}  // namespace d9d::peft
