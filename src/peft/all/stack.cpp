// PeftStack and building a method from any config.
#include <d9d/peft/all/method.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/registry.h>

#include <fmt/format.h>

#include "../rollback.h"

#include <unordered_set>

namespace d9d::peft {

PeftStack::PeftStack(std::vector<std::unique_ptr<PeftMethodBase>> methods)
    : PeftMethod(PeftStackConfig{}), methods_(std::move(methods)) {
  if (methods_.empty()) throw PeftError("PeftStack: the method list is empty; pass at least one method");
  for (size_t i = 0; i < methods_.size(); ++i) {
    if (!methods_[i]) throw PeftError(fmt::format("PeftStack: method {} is null", i));
  }
}

PeftStack PeftStack::from_config(const PeftStackConfig& config) {
  validate(config);
  std::vector<std::unique_ptr<PeftMethodBase>> methods;
  for (const auto& method : config.methods) methods.push_back(peft_method_from_config(method));
  PeftStack stack(std::move(methods));
  stack.config_ = config;
  return stack;
}

PeftInjectionResult PeftStack::inject(torch::nn::Module& module) {
  InjectionSnapshot snapshot(module);
  PeftInjectionResult result;
  std::unordered_set<const void*> seen;
  try {
    for (auto& method : methods_) {
      auto part = method->inject(module);
      for (auto& p : part.parameters_to_train) {
        if (seen.insert(p.unsafeGetTensorImpl()).second) result.parameters_to_train.push_back(p);
      }
      for (auto& mapper : part.load_state_mappers) result.load_state_mappers.push_back(std::move(mapper));
    }
  } catch (...) {
    // Take out what the methods already applied added, without merging it:
    // the base weights and every requires_grad flag are as they were.
    snapshot.restore();
    throw;
  }
  return result;
}

void PeftStack::merge(torch::nn::Module& module) {
  for (size_t i = methods_.size(); i-- > 0;) methods_[i]->merge(module);
}

std::unique_ptr<PeftMethodBase> peft_method_from_config(const AnyPeftConfig& config) {
  validate(config);
  return method_for_kind(config.kind()).make_method(config);
}

}  // namespace d9d::peft
