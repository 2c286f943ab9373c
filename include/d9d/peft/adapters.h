#pragma once

// Several named adapters in one model, as Hugging Face PEFT has them: list,
// activate, delete, merge, disable for a scope, cast. These work on every
// adapter layer (`AdapterLayer`), whatever the method.
//
// ```
// auto a = d9d::peft::hf::load_adapter(*model, "adapters/summarise", "summarise");
// auto b = d9d::peft::hf::load_adapter(*model, "adapters/translate", "translate");  // added inactive
// d9d::peft::set_adapter(*model, "translate");  // only "translate" computes and trains
// {
//   d9d::peft::DisableAdapters off(*model);  // the base model alone in this scope
//   auto reference = model->forward(ids);
// }
// d9d::peft::delete_adapter(*model, "summarise");
// ```
//
// The active set is the model's: every adapter layer computes the active
// adapters it holds (a layer holding none of them computes its base alone),
// and only active adapters' weights require grad.

#include <d9d/peft/adapter_layer.h>

#include <c10/core/ScalarType.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace torch::nn {
class Module;
}

namespace d9d::peft {

/// One adapter layer of a model and where it hangs.
struct AdapterLayerEntry {
  std::string name;  ///< qualified name (`layers.0.attention.q_proj`)
  std::shared_ptr<torch::nn::Module> module;
  AdapterLayer* layer = nullptr;
  torch::nn::Module* parent = nullptr;
  std::string child_name;
};

/// Every adapter layer of `model`, depth-first in registration order.
std::vector<AdapterLayerEntry> adapter_layers(const torch::nn::Module& model);

/// The adapters in `model`, in the order they were added (first seen).
std::vector<std::string> adapter_names(const torch::nn::Module& model);

/// The active adapters of `model`, in the order they were added.
std::vector<std::string> active_adapters(const torch::nn::Module& model);

/// Makes `names` the active adapters (several are summed) and every other
/// adapter inactive; active adapters' weights require grad, inactive ones'
/// do not. An unknown name is a `PeftError` listing the adapters there are.
void set_adapter(torch::nn::Module& model, const std::vector<std::string>& names);
void set_adapter(torch::nn::Module& model, const std::string& name);

/// Removes adapter `name` from every layer without merging it. A layer left
/// with no adapter gets its base layer back in place (original keys and
/// forward). If `name` was active, the other active adapters stay active; if
/// none was, the first remaining adapter becomes active, as PEFT does.
void delete_adapter(torch::nn::Module& model, const std::string& name);

/// Folds adapter `adapter_name` into the base weights of the layers whose
/// qualified name `selects` accepts and removes it from them (layers left
/// with no adapter get their base back). Returns how many layers were merged.
///
/// As PEFT's `safe_merge`, and before any layer is changed: an adapter
/// holding NaN or Inf is refused, and so is one whose merge would make a
/// finite base weight non-finite (an overflow), each a `PeftError` naming
/// the layer; the model is then as it was. Inside an `AllowNonFiniteMerge`
/// scope both checks are skipped.
size_t merge_adapter(torch::nn::Module& model, const std::function<bool(const std::string&)>& selects,
                     const std::string& adapter_name);

/// Lets `merge_adapter` and `merge_peft` merge adapters that hold NaN or Inf
/// or overflow the base weight, for the current thread while it lives (a
/// guard, as `torch::NoGradGuard`):
///
/// ```
/// {
///   d9d::peft::AllowNonFiniteMerge allow;
///   d9d::peft::merge_peft(lora, *model);  // merged whatever the values
/// }
/// ```
class AllowNonFiniteMerge {
 public:
  AllowNonFiniteMerge();
  ~AllowNonFiniteMerge();
  AllowNonFiniteMerge(const AllowNonFiniteMerge&) = delete;
  AllowNonFiniteMerge& operator=(const AllowNonFiniteMerge&) = delete;
  /// Whether a guard is alive on this thread.
  static bool enabled();

 private:
  bool previous_;
};

/// Folds adapters into the base weights and keeps them, marked merged, so
/// that `unmerge_adapters` can take them out again: PEFT's
/// `model.merge_adapter(adapter_names, safe_merge=True)`. `names` empty: the
/// active adapters. A merged model computes what it did, at the base layer's
/// cost; `merge_adapter` instead merges and removes an adapter for good.
///
/// ```
/// d9d::peft::merge_adapters_in_place(*model);  // the active adapters
/// auto fast = model->forward(ids);
/// d9d::peft::unmerge_adapters(*model);         // the adapters compute apart again
/// ```
///
/// All or nothing, and safe as `merge_adapter`: before any weight changes,
/// an adapter holding NaN or Inf, or one whose merge overflows a layer (tried
/// aside, one layer at a time, and undone bit-exactly), is a `PeftError`
/// naming the layer; so are an unknown name, no active adapter to merge, an
/// adapter already merged into a layer, and a layer whose adapters are
/// disabled (`DisableAdapters`). `AllowNonFiniteMerge` skips the value checks.
void merge_adapters_in_place(torch::nn::Module& model, const std::vector<std::string>& names = {});

/// Takes every merged adapter back out of the base weights (PEFT's
/// `model.unmerge_adapter()`), in the reverse order of merging; the base
/// weights are then as before the merge up to floating-point rounding.
/// Nothing merged: `PeftError`.
void unmerge_adapters(torch::nn::Module& model);


/// Casts adapter `name`'s weights to `dtype` (PEFT's `cast_adapter_dtype`
/// keeps adapters in float32 under a bf16/fp16 base). A layer computes the
/// adapter's term in the adapter's dtype and adds it in the base's, as PEFT
/// does. Parameters keep their identity, so an optimizer built before still
/// holds them. Unknown name: `PeftError`.
void cast_adapter_dtype(torch::nn::Module& model, const std::string& name, c10::ScalarType dtype = c10::kFloat);

/// Sets what every adapter derives from the base weights (DoRA's magnitude)
/// from the base weights the model holds now. Loading a checkpoint through
/// `load_model_state` / `load_state_dict` does this by itself; call it after
/// writing base weights any other way, before loading trained adapter weights.
void after_base_weights_loaded(torch::nn::Module& model);

/// Switches every adapter of a model off for a scope (PEFT's
/// `disable_adapter()` context): inside it the model computes its base
/// alone; on leaving the scope every layer is enabled again as it was.
/// Layers with merged adapters cannot compute without them: `PeftError`.
class DisableAdapters {
 public:
  explicit DisableAdapters(torch::nn::Module& model);
  ~DisableAdapters();
  DisableAdapters(const DisableAdapters&) = delete;
  DisableAdapters& operator=(const DisableAdapters&) = delete;

 private:
  std::vector<std::pair<std::shared_ptr<torch::nn::Module>, bool>> saved_;
};

}  // namespace d9d::peft
