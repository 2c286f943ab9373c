#pragma once

#include <d9d/nn/adaptable.h>
#include <d9d/peft/adapter_layer.h>
#include <d9d/peft/lora/options.h>

#include <torch/nn/module.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace d9d::peft {

/// What the LoRA wrappers share: the named adapters of one layer, their
/// order, which are active and merged, whether adapters are enabled, and the
/// `AdapterLayer` bookkeeping built on that. `Adapter` is the module holding
/// one adapter's weights (`LoRALinearAdapterImpl`, `LoRAEmbeddingAdapterImpl`).
///
/// Keys: the first adapter's weights sit directly on the wrapper, so a model
/// with one LoRA keeps d9d's keys (`q_proj.lora_A.weight`); every further
/// adapter `name` sits under `adapters.<name>.`. Deleting the first adapter
/// moves the next one to the top.
template <typename Adapter>
class LoRALayer : public torch::nn::Module, public d9d::nn::LayerOverride, public AdapterLayer {
 public:
  using Entry = std::pair<std::string, std::shared_ptr<Adapter>>;

  std::string peft_type() const override { return "LORA"; }
  std::vector<std::string> adapter_names() const override;
  std::vector<std::string> active_adapters() const override { return active_; }
  void set_active_adapters(const std::vector<std::string>& names) override;
  bool adapters_enabled() const override { return enabled_; }
  void set_adapters_enabled(bool enabled) override { enabled_ = enabled; }
  void delete_adapter(const std::string& name) override;
  std::shared_ptr<torch::nn::Module> adapter_module(const std::string& name) const override { return find(name); }
  std::vector<std::string> merged_adapters() const override { return merged_; }
  std::vector<std::string> fresh_state_keys() const override;
  void after_base_loaded(const model_state::KeySet& loaded_adapter_keys) override;

  const std::vector<Entry>& entries() const noexcept { return entries_; }
  /// The adapter `name`, or null.
  std::shared_ptr<Adapter> find(const std::string& name) const;
  /// The adapter `name` (`PeftError` naming the ones held if absent).
  Adapter& adapter(const std::string& name) const;
  /// The adapter's state keys relative to the layer (under `adapters.<name>.` unless first).
  std::string key_prefix(const std::string& name) const;

  /// Re-initialises every adapter as its options say (and DoRA's magnitude
  /// from the current weights).
  void reset_parameters();
  /// DoRA: sets adapter `name`'s magnitude (empty: the first adapter) from
  /// the current base weight with the adapter's delta added, as at creation.
  /// Loading base weights through the mapper does this by itself.
  void reset_magnitude(const std::string& name = {});

  /// The first adapter's scale and options.
  double scale() const { return pick({}).scale(); }
  const LoRAParameters& options() const { return pick({}).options(); }

 protected:
  /// `name`'s adapter; the first one for an empty name.
  Adapter& pick(const std::string& name) const;
  /// Appends an inactive, frozen adapter (`PeftError` if the name is taken or unusable).
  void append(const std::string& name, std::shared_ptr<Adapter> adapter);
  /// Throws `PeftError` unless adapter `name` is held and (un)merged as `merged` says.
  Adapter& require_merged(const std::string& name, bool merged, const char* what) const;
  void set_merged(const std::string& name, bool merged);
  bool is_merged(const std::string& name) const;
  /// The second and later adapters as a `ModuleDict`, or null if there are none.
  std::shared_ptr<torch::nn::Module> further_adapters() const;
  void print_adapters(std::ostream& stream, const char* type) const;

  /// Registers the adapters as the key layout above says.
  virtual void relayout() = 0;
  virtual void reset_adapter(Adapter& adapter) = 0;
  virtual void reset_adapter_magnitude(Adapter& adapter) = 0;

  std::vector<Entry> entries_;
  std::vector<std::string> active_;
  std::vector<std::string> merged_;
  bool enabled_ = true;
};

}  // namespace d9d::peft
