// What the LoRA wrappers share: DoRA's magnitude, re-initialisation, printing.
#include <d9d/peft/detail/adapter_set_impl.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/conv2d.h>
#include <d9d/peft/lora/embedding.h>
#include <d9d/peft/lora/grouped_linear.h>
#include <d9d/peft/lora/linear.h>

namespace d9d::peft {

const LoRAParameters& lora_parameters(const AdapterOptions& options) {
  const auto* p = dynamic_cast<const LoRAParameters*>(&options);
  if (!p) throw PeftError("add_adapter: a LoRA layer takes LoRAParameters as the adapter's options");
  return *p;
}

template <typename Adapter>
void LoRALayer<Adapter>::after_base_loaded(const model_state::KeySet& loaded_adapter_keys) {
  // DoRA's magnitude is the norm of the base weight with the delta added: it
  // follows newly loaded base weights unless it was loaded itself.
  for (auto& [name, a] : this->entries_) {
    if (init_changes_base(a->options().init()) && !this->is_merged(name)) {
      base_reloaded(*a, loaded_adapter_keys.count(this->key_prefix(name) + "lora_A.weight") > 0);
    }
    if (!a->options().use_dora() || this->is_merged(name)) continue;
    if (loaded_adapter_keys.count(this->key_prefix(name) + "lora_magnitude_vector")) continue;
    reset_adapter_magnitude(*a);
  }
}

template <typename Adapter>
void LoRALayer<Adapter>::reset_parameters() {
  for (auto& e : this->entries_) reset_adapter(*e.second);
}

template <typename Adapter>
void LoRALayer<Adapter>::reset_magnitude(const std::string& name) {
  Adapter& a = this->pick(name);
  if (!a.options().use_dora()) throw PeftError("reset_magnitude: this LoRA adapter does not use DoRA");
  reset_adapter_magnitude(a);
}

template <typename Adapter>
void LoRALayer<Adapter>::describe(std::ostream& stream, const Adapter& adapter) const {
  const auto& o = adapter.options();
  stream << "r=" << o.r() << ", alpha=" << o.alpha() << ", dropout=" << o.dropout();
  if (o.use_rslora()) stream << ", rslora";
  if (o.use_dora()) stream << ", dora";
}

template class AdapterSetLayer<LoRALinearAdapterImpl>;
template class AdapterSetLayer<LoRAEmbeddingAdapterImpl>;
template class AdapterSetLayer<LoRAGroupedLinearAdapterImpl>;
template class LoRALayer<LoRALinearAdapterImpl>;
template class LoRALayer<LoRAEmbeddingAdapterImpl>;
template class LoRALayer<LoRAGroupedLinearAdapterImpl>;
template class AdapterSetLayer<LoRAConv2dAdapterImpl>;
template class LoRALayer<LoRAConv2dAdapterImpl>;

}  // namespace d9d::peft
