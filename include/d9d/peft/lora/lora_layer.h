#pragma once

#include <d9d/peft/adapter_set.h>
#include <d9d/peft/lora/options.h>

#include <string>

namespace d9d::peft {

/// What the LoRA wrappers (`LoRALinearImpl`, `LoRAEmbeddingImpl`) share on
/// top of `AdapterSetLayer`: the PEFT type, DoRA's magnitude following the
/// base weights, re-initialisation, and the first adapter's options.
/// `options` as LoRA's (`PeftError` for another method's): what `add_adapter` takes.
const LoRAParameters& lora_parameters(const AdapterOptions& options);

template <typename Adapter>
class LoRALayer : public AdapterSetLayer<Adapter> {
 public:
  std::string peft_type() const override { return "LORA"; }
  void after_base_loaded(const model_state::KeySet& loaded_adapter_keys) override;

  /// Re-initialises every adapter as its options say (and DoRA's magnitude
  /// from the current weights).
  void reset_parameters();
  /// DoRA: sets adapter `name`'s magnitude (empty: the first adapter) from
  /// the current base weight with the adapter's delta added, as at creation.
  /// Loading base weights through the mapper does this by itself.
  void reset_magnitude(const std::string& name = {});

  /// The first adapter's scale and options.
  double scale() const { return this->pick({}).scale(); }
  const LoRAParameters& options() const { return this->pick({}).options(); }

 protected:
  void describe(std::ostream& stream, const Adapter& adapter) const override;
  virtual void reset_adapter(Adapter& adapter) = 0;
  virtual void reset_adapter_magnitude(Adapter& adapter) = 0;
  /// After the loader wrote new base weights: initialisations that start from
  /// the base weight (PiSSA, OLoRA) redo it unless the adapter's factors were
  /// loaded in the same pass (`factors_loaded`).
  virtual void base_reloaded(Adapter& adapter, bool factors_loaded) {
    (void)adapter;
    (void)factors_loaded;
  }
};

}  // namespace d9d::peft
