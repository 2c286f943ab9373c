#include <d9d/peft/errors.h>
#include <d9d/peft/full_tune/method.h>
#include <d9d/peft/module_tree.h>

#include <torch/nn/module.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../builtin_methods.h"
#include "../config_json.h"

#include <unordered_set>

namespace d9d::peft {

FullTune::FullTune(FullTuneConfig config)
    : PeftMethod(std::move(config)), pattern_(config_json::validated_pattern(config_), "module_name_pattern") {}

PeftInjectionResult FullTune::inject(torch::nn::Module& module) {
  PeftInjectionResult result;
  std::unordered_set<const void*> seen;
  std::vector<std::string> matched;
  auto visit = [&](const std::string& name, const torch::nn::Module& m) {
    if (!pattern_.full_match(name)) return;
    matched.push_back("'" + name + "'");
    for (const auto& p : m.parameters()) {
      if (seen.insert(p.unsafeGetTensorImpl()).second) result.parameters_to_train.push_back(p);
    }
  };
  visit("", module);
  const auto modules = list_modules(module);
  for (const auto& entry : modules) visit(entry.name, *entry.module);

  const std::string& pattern = config_.module_name_pattern;
  if (matched.empty()) {
    std::vector<std::string> names;
    for (const auto& entry : modules) {
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

PeftMethodRegistration full_tune_registration() {
  return d9d_config_registration<FullTuneConfig, FullTune>(&parse_full_tune_config_json);
}

}  // namespace d9d::peft
