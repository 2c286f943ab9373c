#pragma once

#include <d9d/model_state/load.h>

#include <ATen/core/Tensor.h>
#include <torch/nn/modules/container/any.h>

#include <memory>
#include <string>
#include <vector>

namespace d9d::peft {

class MixedBatch;

/// What one adapter of an adapter layer is configured with. Each method's
/// per-layer options derive from it (`LoRAParameters`), so generic code can
/// hand them through `AdapterLayer::add_adapter`.
struct AdapterOptions {
  virtual ~AdapterOptions() = default;
};

/// The name an adapter gets when none is given (PEFT's too).
inline const std::string kDefaultAdapterName = "default";

/// Throws `PeftError` unless `name` is a usable adapter name: non-empty,
/// letters, digits, `_` and `-` only (it becomes part of state-dict keys).
void validate_adapter_name(const std::string& name);

/// The one interface of every PEFT layer: a wrapper module that holds its
/// base layer (`base`) and one or more named adapters. Generic code
/// (`set_adapter`, `delete_adapter`, `DisableAdapters`, adapter state dicts,
/// merging, rollback, the loader's after-load hook) works through it alone and
/// never names a concrete method.
///
/// Implemented by `LoRALinearImpl` and `LoRAEmbeddingImpl`; a new method's
/// layers implement it too (see docs/adding-a-method.md).
///
/// Adapter weights are fresh state: a checkpoint of the original model does
/// not contain them, so loading does not report them missing. Methods never
/// inject into the inside of an adapter layer.
class AdapterLayer : public model_state::FreshState {
 public:
  /// The Hugging Face PEFT `peft_type` of the method (`"LORA"`); it selects
  /// the registered writer when the adapter is saved, and names the method in
  /// messages.
  virtual std::string peft_type() const = 0;

  /// The adapters this layer holds, in the order they were added.
  virtual std::vector<std::string> adapter_names() const = 0;
  bool has_adapter(const std::string& name) const;
  /// The adapters that compute, in the order they were added.
  virtual std::vector<std::string> active_adapters() const = 0;
  /// Activates the adapters of `names` this layer holds (others are ignored)
  /// and deactivates the rest; only active adapters' weights require grad.
  virtual void set_active_adapters(const std::vector<std::string>& names) = 0;
  /// With adapters disabled the layer computes its base alone.
  virtual bool adapters_enabled() const = 0;
  virtual void set_adapters_enabled(bool enabled) = 0;

  /// Adds an inactive, frozen adapter. `options` must be this method's
  /// options type (`PeftError` otherwise, or if the name is taken).
  virtual void add_adapter(const std::string& name, const AdapterOptions& options) = 0;
  /// Removes an adapter; its weights leave the layer, nothing is merged.
  virtual void delete_adapter(const std::string& name) = 0;
  /// The module that holds adapter `name`'s weights: its parameter names are
  /// the adapter's state keys relative to the layer, as PEFT's files name them
  /// (`lora_A.weight`, `lora_magnitude_vector`, ...).
  virtual std::shared_ptr<torch::nn::Module> adapter_module(const std::string& name) const = 0;

  /// Folds adapter `name` into the base weight in place; the adapter stays,
  /// marked merged (it no longer adds its term in `forward`).
  virtual void merge_adapter(const std::string& name) = 0;
  /// Takes a merged adapter back out of the base weight.
  virtual void unmerge_adapter(const std::string& name) = 0;
  virtual std::vector<std::string> merged_adapters() const = 0;
  /// What merging adapter `name` adds to the base weight (`PeftError` for
  /// methods whose merge is not a sum, such as DoRA).
  virtual at::Tensor delta_weight(const std::string& name) const = 0;

  /// Gives the base layer back, as the module to put where this layer hangs;
  /// calls made through the base layer's holders reach it again.
  virtual torch::nn::AnyModule unwrap() = 0;

  /// Runs after the base weights were loaded into this layer (for DoRA, the
  /// magnitude is set from them). `loaded_adapter_keys` are the adapter
  /// state keys (relative to the layer) that were loaded too: state derived
  /// from the base must not overwrite what was just loaded.
  virtual void after_base_loaded(const model_state::KeySet& loaded_adapter_keys) { (void)loaded_adapter_keys; }

  /// The loader's hook (`model_state::FreshState`): calls `after_base_loaded`
  /// when a key of the base (`base.*`) was among `loaded_keys`.
  void after_state_loaded(const model_state::KeySet& loaded_keys) override;

  /// Whether this layer computes a mixed batch (`MixedBatchScope`): each row
  /// of its input with its own adapter. A layer that does implements it in
  /// `forward` when `mixed_batch()` is set.
  virtual bool supports_mixed_batch() const { return false; }
  /// Set by `MixedBatchScope` (null when it ends); `layer_name` is the
  /// layer's qualified name, for messages.
  void set_mixed_batch(std::shared_ptr<const MixedBatch> batch, std::string layer_name = {});
  /// The mixed batch this layer is computing, or null.
  const MixedBatch* mixed_batch() const noexcept { return mixed_batch_.get(); }

 protected:
  /// Inside a mixed batch: `PeftError` naming the layer unless `input`'s
  /// first dimension has one row per adapter name.
  void check_mixed_batch_rows(const at::Tensor& input) const;
  /// Inside a mixed batch: `PeftError` naming the layer if an adapter was
  /// merged after the scope began (its rows would get it twice).
  void check_mixed_batch_unmerged() const;
  /// Called when a scope sets or clears this layer's mixed batch (a layer
  /// drops what it cached for the previous one).
  virtual void mixed_batch_changed() {}

 private:
  std::shared_ptr<const MixedBatch> mixed_batch_;
  std::string mixed_batch_layer_;
};

}  // namespace d9d::peft
