#include "rollback.h"

#include <d9d/peft/adapters.h>
#include <d9d/peft/module_tree.h>

#include <torch/nn/module.h>

#include <algorithm>

namespace d9d::peft {

InjectionSnapshot::InjectionSnapshot(torch::nn::Module& model) : model_(model) {
  for (const auto& entry : adapter_layers(model)) {
    layers_.push_back({entry.module, entry.layer->adapter_names(), entry.layer->active_adapters(),
                       entry.layer->adapters_enabled()});
  }
  for (const auto& p : model.parameters()) flags_.emplace_back(p, p.requires_grad());
}

void InjectionSnapshot::restore() noexcept {
  try {
    for (const auto& entry : adapter_layers(model_)) {
      auto before = std::find_if(layers_.begin(), layers_.end(),
                                 [&](const LayerState& s) { return s.module == entry.module; });
      if (before == layers_.end()) {
        // A wrapper added since: its base goes back where it hung.
        replace_child(*entry.parent, entry.child_name, entry.layer->unwrap());
        continue;
      }
      for (const auto& name : entry.layer->adapter_names()) {
        if (std::find(before->adapters.begin(), before->adapters.end(), name) == before->adapters.end()) {
          entry.layer->delete_adapter(name);
        }
      }
      entry.layer->set_active_adapters(before->active);
      entry.layer->set_adapters_enabled(before->enabled);
    }
  } catch (...) {
    // Restoring touches only what injection added; nothing here is expected
    // to fail, and an error must not replace the one being propagated.
  }
  for (auto& [tensor, flag] : flags_) tensor.requires_grad_(flag);
}

}  // namespace d9d::peft
