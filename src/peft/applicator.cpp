#include <d9d/model_state/mapper/adapters.h>
#include <d9d/model_state/mapper/compose/parallel.h>
#include <d9d/model_state/mapper/leaf/identity.h>
#include <d9d/peft/applicator.h>
#include <d9d/peft/errors.h>

#include <torch/nn/module.h>

#include "rollback.h"

#include <unordered_set>

namespace d9d::peft {

model_state::MapperPtr inject_peft_and_freeze(PeftMethodBase& method, torch::nn::Module& module) {
  InjectionSnapshot snapshot(module);
  try {
    PeftInjectionResult result = method.inject(module);

    std::unordered_set<const void*> train;
    for (const auto& p : result.parameters_to_train) train.insert(p.unsafeGetTensorImpl());
    if (train.empty()) {
      throw PeftError(
          "inject_peft_and_freeze: the method trains no parameter; check its module_name_pattern (an adapter "
          "added to a model that already has adapters starts inactive: add it with hf::add_adapter or "
          "hf::load_adapter, then activate it with set_adapter)");
    }
    for (auto& p : module.parameters()) p.requires_grad_(train.count(p.unsafeGetTensorImpl()) > 0);

    model_state::KeySet produced;
    for (const auto& mapper : result.load_state_mappers) {
      for (const auto& group : mapper->state_dependency_groups()) {
        produced.insert(group.outputs.begin(), group.outputs.end());
      }
    }
    const model_state::KeySet fresh = model_state::fresh_state_keys(module);
    std::vector<model_state::MapperPtr> parts = std::move(result.load_state_mappers);
    for (const auto& key : model_state::module_state_keys(module)) {
      if (!produced.count(key) && !fresh.count(key)) parts.push_back(std::make_shared<model_state::Identity>(key));
    }
    return std::make_shared<model_state::Parallel>(std::move(parts));
  } catch (...) {
    snapshot.restore();
    throw;
  }
}

void merge_peft(PeftMethodBase& method, torch::nn::Module& module) { method.merge(module); }

std::vector<at::Tensor> trainable_parameters(const torch::nn::Module& module) {
  std::vector<at::Tensor> out;
  for (const auto& p : module.parameters()) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}

}  // namespace d9d::peft
