// FullTune, PeftStack, the config factory and the applicator.
#include <d9d/model_state/mapper/adapters.h>
#include <d9d/model_state/mapper/compose/parallel.h>
#include <d9d/model_state/mapper/leaf/identity.h>
#include <d9d/peft/all/method.h>
#include <d9d/peft/applicator.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/full_tune/method.h>
#include <d9d/peft/lora/method.h>
#include <d9d/peft/module_tree.h>

#include <torch/nn/module.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <unordered_set>

namespace d9d::peft {

namespace {

/// Appends the tensors of `from` not yet in `to` (by identity).
void append_unique(std::vector<at::Tensor>& to, const std::vector<at::Tensor>& from) {
  std::unordered_set<const void*> seen;
  for (const auto& t : to) seen.insert(t.unsafeGetTensorImpl());
  for (const auto& t : from) {
    if (seen.insert(t.unsafeGetTensorImpl()).second) to.push_back(t);
  }
}

}  // namespace

// -------------------------------------------------------------- FullTune

FullTune::FullTune(FullTuneConfig config) : PeftMethod(std::move(config)) {
  validate(config_);
  pattern_ = std::regex(config_.module_name_pattern, std::regex::ECMAScript);
}

PeftInjectionResult FullTune::inject(torch::nn::Module& module) {
  PeftInjectionResult result;
  std::vector<std::string> matched;
  auto visit = [&](const std::string& name, const torch::nn::Module& m) {
    if (!std::regex_match(name, pattern_)) return;
    matched.push_back("'" + name + "'");
    append_unique(result.parameters_to_train, m.parameters());
  };
  visit("", module);
  for (const auto& entry : list_modules(module)) visit(entry.name, *entry.module);

  const std::string& pattern = config_.module_name_pattern;
  if (matched.empty()) {
    std::vector<std::string> names;
    for (const auto& entry : list_modules(module)) {
      if (names.size() == 5) break;
      names.push_back("'" + entry.name + "'");
    }
    throw PeftError(fmt::format("FullTune: module_name_pattern \"{}\" matches no module; it must match the whole "
                                "qualified name, and modules here are named like {}",
                                pattern, fmt::join(names, ", ")));
  }
  if (result.parameters_to_train.empty()) {
    throw PeftError(fmt::format("FullTune: module_name_pattern \"{}\" matches {}, which hold no parameters",
                                pattern, fmt::join(matched, ", ")));
  }
  return result;
}

void FullTune::merge(torch::nn::Module&) {}

// ------------------------------------------------------------- PeftStack

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
  PeftInjectionResult result;
  size_t applied = 0;
  try {
    for (auto& method : methods_) {
      auto part = method->inject(module);
      append_unique(result.parameters_to_train, part.parameters_to_train);
      for (auto& mapper : part.load_state_mappers) result.load_state_mappers.push_back(std::move(mapper));
      ++applied;
    }
  } catch (...) {
    // Undo the methods already applied: their adapters are untrained, so
    // merging them leaves the base weights as they were.
    for (size_t i = applied; i-- > 0;) methods_[i]->merge(module);
    throw;
  }
  return result;
}

void PeftStack::merge(torch::nn::Module& module) {
  for (size_t i = methods_.size(); i-- > 0;) methods_[i]->merge(module);
}

std::unique_ptr<PeftMethodBase> peft_method_from_config(const AnyPeftConfig& config) {
  return std::visit(
      [](const auto& c) -> std::unique_ptr<PeftMethodBase> {
        using C = std::decay_t<decltype(c)>;
        if constexpr (std::is_same_v<C, LoRAConfig>) return std::make_unique<LoRA>(c);
        else if constexpr (std::is_same_v<C, FullTuneConfig>) return std::make_unique<FullTune>(c);
        else return std::make_unique<PeftStack>(PeftStack::from_config(c));
      },
      config.value);
}

// ------------------------------------------------------------ applicator

model_state::MapperPtr inject_peft_and_freeze(PeftMethodBase& method, torch::nn::Module& module) {
  PeftInjectionResult result = method.inject(module);

  std::unordered_set<const void*> train;
  for (const auto& p : result.parameters_to_train) train.insert(p.unsafeGetTensorImpl());
  if (train.empty()) {
    method.merge(module);
    throw PeftError(
        "inject_peft_and_freeze: the method trains no parameter; check its module_name_pattern (a LoRA adapter "
        "added to a model that already has adapters starts inactive: add it with hf::add_adapter or "
        "hf::load_adapter, then activate it with set_adapter)");
  }
  for (auto& p : module.parameters()) p.requires_grad_(train.count(p.unsafeGetTensorImpl()) > 0);

  model_state::KeySet produced;
  for (const auto& mapper : result.load_state_mappers) {
    for (const auto& group : mapper->state_dependency_groups()) produced.insert(group.outputs.begin(), group.outputs.end());
  }
  const model_state::KeySet fresh = model_state::fresh_state_keys(module);
  std::vector<model_state::MapperPtr> parts = std::move(result.load_state_mappers);
  for (const auto& key : model_state::module_state_keys(module)) {
    if (!produced.count(key) && !fresh.count(key)) parts.push_back(std::make_shared<model_state::Identity>(key));
  }
  return std::make_shared<model_state::Parallel>(std::move(parts));
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
