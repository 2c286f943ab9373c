#pragma once

#include <d9d/peft/base.h>
#include <d9d/peft/lora/config.h>

#include <d9d/peft/lora/layer.h>
#include <d9d/peft/pattern.h>

#include <functional>
#include <optional>
#include <string>

namespace d9d::peft {

/// Which layers LoRA adapts, and how: `select(name)` returns the options for
/// a qualified module name, or nothing to leave it alone.
struct LoRATargeting {
  std::function<std::optional<LoRAParameters>(const std::string& name)> select;
  /// The rule, for messages: `module_name_pattern ".*_proj"`.
  std::string what;
  /// How names are matched, for the "matches no module" message.
  std::string hint;
  /// The adapter the selected layers get.
  std::string adapter_name = kDefaultAdapterName;
};

/// Adds adapter `targeting.adapter_name` to every layer `targeting` selects:
/// a plain layer gets a LoRA wrapper (see `LoRA` for what can be adapted),
/// an existing LoRA layer gets one more adapter. Returns one `Rename` per
/// newly wrapped base parameter and the new adapter's parameters to train.
///
/// In a model without adapters the new one is active. In a model that has
/// some, it joins the model's active set only if its name is already active
/// (a second method adding to the same adapter); otherwise it is added
/// inactive and frozen and `parameters_to_train` is empty: activate it with
/// `set_adapter`. A layer that already holds an adapter of that name is a
/// `PeftError`. Plans everything before touching the model, so an error
/// leaves it as it was.
PeftInjectionResult inject_lora(torch::nn::Module& module, const LoRATargeting& targeting);

/// Low-Rank Adaptation: wraps every linear layer whose qualified name fully
/// matches the pattern in a `LoRALinearImpl`, and emits a `Rename` per wrapped
/// layer (`x.weight -> x.base.weight`, and `x.bias -> x.base.bias`) so a
/// standard checkpoint still loads.
///
/// ```
/// d9d::peft::LoRA lora({".*attention\\..*_proj", d9d::peft::LoRAParameters().r(8).alpha(16).dropout(0.05)});
/// auto mapper = d9d::peft::inject_peft_and_freeze(lora, *model);
/// ```
///
/// Adaptable: `d9d::nn::Linear` and `d9d::nn::Embedding` anywhere, and `torch::nn::Linear` whose parent
/// is a `Sequential`, `ModuleList` or `ModuleDict`. Modules with children that
/// match (containers) are passed over; a matched leaf that cannot be adapted,
/// or a pattern that adapts nothing, is a `PeftError`. Layers inside existing
/// adapters are never wrapped.
class LoRA : public PeftMethod<LoRAConfig> {
 public:
  /// Validates the configuration (`ConfigError`).
  explicit LoRA(LoRAConfig config);
  static LoRA from_config(const LoRAConfig& config) { return LoRA(config); }

  PeftInjectionResult inject(torch::nn::Module& module) override;
  /// Merges the LoRA wrappers whose names match the pattern and puts their
  /// base layers back in place.
  void merge(torch::nn::Module& module) override;

 private:
  Pattern pattern_;
};

}  // namespace d9d::peft
