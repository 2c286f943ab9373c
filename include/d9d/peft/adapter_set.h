#pragma once

#include <d9d/nn/adaptable.h>
#include <d9d/peft/adapter_layer.h>

#include <torch/nn/module.h>

#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace d9d::peft {

/// The part of `AdapterLayer` every method's layers share: the named adapters
/// of one layer, their order, which are active and merged, whether adapters
/// are enabled, and the key layout. `Adapter` is the module that holds one
/// adapter's weights (`LoRALinearAdapterImpl`, `IA3AdapterImpl`); its
/// parameter names are the adapter's keys in PEFT's files.
///
/// Keys: the first adapter's weights sit directly on the layer, so a model
/// with one adapter keeps short keys (`q_proj.lora_A.weight`, `q_proj.ia3_l`);
/// every further adapter `name` sits under `adapters.<name>.`. Deleting the
/// first adapter moves the next one to the top (`relayout`).
///
/// A method's layer derives from this, implements `relayout` (register the
/// top adapter's parameters on the layer) and the rest of `AdapterLayer`
/// (forward, add, merge, unwrap). Its source includes
/// `<d9d/peft/detail/adapter_set_impl.h>` and instantiates the template.
template <typename Adapter>
class AdapterSetLayer : public torch::nn::Module, public d9d::nn::LayerOverride, public AdapterLayer {
 public:
  using Entry = std::pair<std::string, std::shared_ptr<Adapter>>;

  std::vector<std::string> adapter_names() const override;
  std::vector<std::string> active_adapters() const override { return active_; }
  void set_active_adapters(const std::vector<std::string>& names) override;
  bool adapters_enabled() const override { return enabled_; }
  void set_adapters_enabled(bool enabled) override { enabled_ = enabled; }
  void delete_adapter(const std::string& name) override;
  std::shared_ptr<torch::nn::Module> adapter_module(const std::string& name) const override { return find(name); }
  std::vector<std::string> merged_adapters() const override { return merged_; }
  std::vector<std::string> fresh_state_keys() const override;

  const std::vector<Entry>& entries() const noexcept { return entries_; }
  /// The adapter `name`, or null.
  std::shared_ptr<Adapter> find(const std::string& name) const;
  /// The adapter `name` (`PeftError` naming the ones held if absent).
  Adapter& adapter(const std::string& name) const;
  /// Where adapter `name`'s keys sit relative to the layer: `""` or `adapters.<name>.`.
  std::string key_prefix(const std::string& name) const;

 protected:
  /// `name`'s adapter; the first one for an empty name.
  Adapter& pick(const std::string& name) const;
  /// Appends an inactive, frozen adapter (`PeftError` if the name is taken or unusable).
  void append(const std::string& name, std::shared_ptr<Adapter> adapter);
  /// Adapter `name`, checked to be merged (or not) as `merged` says (`PeftError` otherwise).
  Adapter& require_merged(const std::string& name, bool merged, const char* what) const;
  void set_merged(const std::string& name, bool merged);
  bool is_merged(const std::string& name) const;
  bool is_active(const std::string& name) const;
  /// Unregisters the `adapters` child; a layer's `relayout` starts with it.
  void clear_further_adapters();
  /// Registers the second and later adapters as the `adapters` child.
  void register_further_adapters();
  /// `type(name*: <describe>; ...; disabled)`: the layer's `pretty_print`.
  void print_adapters(std::ostream& stream, const char* type) const;
  virtual void describe(std::ostream& stream, const Adapter& adapter) const = 0;

  /// Registers the top adapter's weights on the layer.
  virtual void relayout() = 0;

  std::vector<Entry> entries_;
  std::vector<std::string> active_;
  std::vector<std::string> merged_;
  bool enabled_ = true;
};

}  // namespace d9d::peft
