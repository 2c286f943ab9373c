// The state an adapter's layers share, gathered for adapter files.
#include "shared_state.h"

#include <d9d/peft/adapters.h>
#include <d9d/peft/errors.h>

#include <ATen/Functions.h>

#include <fmt/format.h>

#include <algorithm>

namespace d9d::peft::hf::detail {

std::map<std::string, SharedEntry> shared_state(const torch::nn::Module& module, const std::string& adapter) {
  std::map<std::string, SharedEntry> out;
  std::map<std::string, std::string> first_layer;
  for (const auto& entry : adapter_layers(module)) {
    if (!entry.layer->has_adapter(adapter)) continue;
    const auto* shares = dynamic_cast<const SharesAdapterState*>(entry.layer);
    if (shares == nullptr) continue;
    for (const auto& s : shares->shared_adapter_state(adapter)) {
      const std::string key = "base_model." + s.key;
      auto [it, fresh] = out.emplace(key, SharedEntry{{}, s.in_files});
      if (fresh) first_layer[key] = entry.name;
      auto& held = it->second.tensors;
      if (std::any_of(held.begin(), held.end(), [&](const at::Tensor& t) { return t.is_same(s.tensor); })) continue;
      if (!held.empty() && !(held.front().sizes() == s.tensor.sizes() &&
                             at::equal(held.front(), s.tensor.to(held.front().device(), held.front().scalar_type())))) {
        throw PeftError(fmt::format("adapter \"{}\": '{}' and '{}' hold different {} tensors, which an adapter file "
                                    "holds once for the whole model; add the adapter to every layer in one injection "
                                    "so that they share one",
                                    adapter, first_layer[key], entry.name, s.key));
      }
      held.push_back(s.tensor);
    }
  }
  return out;
}

}  // namespace d9d::peft::hf::detail
