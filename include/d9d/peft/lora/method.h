#pragma once

#include <d9d/peft/base.h>
#include <d9d/peft/lora/config.h>

#include <d9d/peft/lora/layer.h>

#include <functional>
#include <optional>
#include <regex>
#include <string>

namespace d9d::peft {

/// Which layers LoRA adapts, and how: `select(name)` returns the options for
/// a qualified module name, or nothing to leave it alone.
struct LoRATargeting {
  std::function<std::optional<LoRALayerOptions>(const std::string& name)> select;
  /// The rule, for messages: `module_name_pattern ".*_proj"`.
  std::string what;
  /// How names are matched, for the "matches no module" message.
  std::string hint;
};

/// Wraps every layer `targeting` selects in a LoRA wrapper (see `LoRA` for
/// what can be adapted) and returns the adapter parameters and one `Rename`
/// per base parameter. Plans and builds every wrapper before touching the
/// model, so an error leaves it as it was.
PeftInjectionResult inject_lora(torch::nn::Module& module, const LoRATargeting& targeting);

/// Merges every LoRA wrapper whose qualified name `selects` accepts and puts
/// its base layer back in place. Returns how many were merged.
size_t merge_lora(torch::nn::Module& module, const std::function<bool(const std::string&)>& selects);

/// Low-Rank Adaptation: wraps every linear layer whose qualified name fully
/// matches the pattern in a `LoRALinearImpl`, and emits a `Rename` per wrapped
/// layer (`x.weight -> x.base.weight`, and `x.bias -> x.base.bias`) so a
/// standard checkpoint still loads.
///
/// ```
/// d9d::peft::LoRA lora({".*attention\\..*_proj", {/*r=*/8, /*alpha=*/16, /*dropout=*/0.05}});
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
  std::regex pattern_;
};

}  // namespace d9d::peft
