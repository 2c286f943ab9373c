// The safe-merge checks shared by merge_adapter and merge_adapters_in_place.
#include "safe_merge.h"

#include <d9d/peft/errors.h>

#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/module.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "non_finite.h"

namespace d9d::peft::detail {

void refuse_non_finite_adapter(const AdapterLayerEntry& entry, const std::string& name, const std::string& what) {
  for (const auto& p : entry.layer->adapter_module(name)->named_parameters()) {
    const int64_t bad = count_non_finite(p.value());
    if (bad == 0) continue;
    throw PeftError(fmt::format("{}: adapter \"{}\" of '{}' holds {} NaN or Inf value{} in {} (of {}); merging "
                                "would write them into the base weight. Nothing was merged; fix or retrain the "
                                "adapter, delete it (delete_adapter), or merge anyway inside an "
                                "AllowNonFiniteMerge scope",
                                what, name, entry.name, bad, bad == 1 ? "" : "s", p.key(), p.value().numel()));
  }
}

void check_merge_stays_finite(const AdapterLayerEntry& entry, const std::vector<std::string>& names,
                              const std::string& what) {
  torch::NoGradGuard no_grad;
  std::vector<std::pair<at::Tensor, at::Tensor>> saved;  // tensor, copy
  std::vector<std::pair<std::string, int64_t>> before;
  for (const auto& p : entry.module->named_parameters()) saved.emplace_back(p.value(), p.value().clone());
  for (const auto& b : entry.module->named_buffers()) saved.emplace_back(b.value(), b.value().clone());
  for (const auto& p : entry.module->named_parameters()) {
    if (p.value().is_floating_point()) before.emplace_back(p.key(), count_non_finite(p.value()));
  }
  for (const auto& name : names) entry.layer->merge_adapter(name);
  std::string overflow;
  for (const auto& p : entry.module->named_parameters()) {
    if (!p.value().is_floating_point()) continue;
    const int64_t now = count_non_finite(p.value());
    for (const auto& [key, count] : before) {
      if (key == p.key() && now > count && overflow.empty()) {
        overflow = fmt::format("{} ({}: {} value{} of {} become NaN or Inf)", p.key(),
                               c10::toString(p.value().scalar_type()), now - count, now - count == 1 ? "" : "s",
                               p.value().numel());
      }
    }
  }
  for (auto it = names.rbegin(); it != names.rend(); ++it) entry.layer->unmerge_adapter(*it);
  for (auto& [tensor, copy] : saved) tensor.copy_(copy);
  if (!overflow.empty()) {
    throw PeftError(fmt::format("{}: merging adapter{} \"{}\" into '{}' overflows {}. Nothing was merged; check "
                                "the adapter's scale and the base dtype, or merge anyway inside an "
                                "AllowNonFiniteMerge scope",
                                what, names.size() == 1 ? "" : "s", fmt::join(names, "\", \""), entry.name, overflow));
  }
}

}  // namespace d9d::peft::detail
