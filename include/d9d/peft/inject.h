#pragma once

#include <d9d/peft/adapter_layer.h>
#include <d9d/peft/base.h>

#include <torch/nn/modules/container/any.h>

#include <functional>
#include <memory>
#include <string>

namespace torch::nn {
class Module;
}

namespace d9d::peft {

/// Which layers a method adapts and how it wraps them; what `inject_adapters`
/// needs from a method.
struct AdapterTargeting {
  /// The method, for messages: `"LoRA"`.
  std::string method;
  /// Adapter layers of this PEFT type get one more adapter; another method's
  /// layers are refused.
  std::string peft_type;
  /// The adapter the selected layers get.
  std::string adapter_name = kDefaultAdapterName;
  /// The options for a qualified module name, or null to leave it alone.
  std::function<std::shared_ptr<const AdapterOptions>(const std::string& name)> select;
  /// Optional: refuses a selected module the method cannot adapt with these
  /// options (a `PeftError` naming `name`), called for every selected module
  /// before any layer is built.
  std::function<void(const std::string& name, const torch::nn::Module& module, const AdapterOptions& options)> check;
  /// A new adapter layer around `module` holding adapter `adapter_name`
  /// (active), typed so that containers can call it, or an empty `AnyModule`
  /// when the method cannot adapt a module of this type.
  std::function<torch::nn::AnyModule(const std::shared_ptr<torch::nn::Module>& module, const AdapterOptions& options,
                                     const std::string& adapter_name)>
      wrap;
  /// Whether the method can wrap a module of this type (for the examples in
  /// messages; `wrap` decides).
  std::function<bool(const torch::nn::Module& module)> adapts;
  /// What the method adapts, for messages: `"d9d::nn::Linear, and torch::nn::Linear inside Sequential, ..."`.
  std::string adaptable;
  /// The rule, for messages: `module_name_pattern ".*_proj"`.
  std::string what;
  /// How names are matched, for the "matches no module" message.
  std::string hint;
};

/// Adds adapter `targeting.adapter_name` to every module `targeting.select`
/// chooses: a plain layer gets a new adapter layer (`targeting.wrap`), an
/// adapter layer of the same method gets one more adapter. Returns a `Rename`
/// per moved base key (`x.weight -> x.base.weight`) and the new adapter's
/// parameters to train.
///
/// In a model without adapters the new one is active. In a model that has
/// some, it joins the model's active set only if its name is already active
/// (a second method adding to the same adapter); otherwise it is added
/// inactive and frozen and `parameters_to_train` is empty: activate it with
/// `set_adapter`. `PeftError`s, before anything changes: a selected leaf the
/// method cannot adapt, a plain torch layer held by a typed member (its calls
/// cannot be redirected), a layer registered at two paths (shared or tied), a
/// layer that already holds an adapter of that name, another method's adapter
/// layer, a rule that adapts nothing. Layers inside adapter layers are never
/// wrapped; modules with children (containers) are passed over.
PeftInjectionResult inject_adapters(torch::nn::Module& module, const AdapterTargeting& targeting);

}  // namespace d9d::peft
