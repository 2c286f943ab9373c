#pragma once

// Hotswapping LoRA adapters, as Hugging Face PEFT's `peft.utils.hotswap`:
// another adapter's weights copied into a loaded adapter's tensors in place.
//
// ```
// d9d::peft::hf::load_adapter(*model, "adapters/summarise");  // adapter "default"
// d9d::peft::prepare_for_hotswap(*model, 16);                 // once, before the optimizer or a graph capture
// // ... build the optimizer, capture a CUDA graph, serve ...
// d9d::peft::hf::hotswap_adapter(*model, "adapters/translate");  // same tensors, new weights
// ```
//
// Nothing is re-injected: the module tree, every adapter parameter (the
// `at::Tensor` objects an optimizer holds and their `data_ptr`) and the
// layer's scale stay as they were, so an optimizer or a captured CUDA graph
// stays valid. A different scale (`lora_alpha`, `r`, rsLoRA) is folded into
// `lora_B` on copy; see docs/multi-adapter.md#hotswap.

#include <d9d/peft/adapter_layer.h>
#include <d9d/peft/hf/config.h>
#include <d9d/peft/hf/files.h>

#include <cstdint>
#include <string>

namespace torch::nn {
class Module;
}

namespace d9d::peft {

/// Pads every LoRA adapter of `model` (every layer, every adapter name) with
/// zeros to rank `target_rank`, so that adapters of any rank up to it can be
/// hotswapped in later without changing a tensor's shape. PEFT's
/// `prepare_model_for_compiled_hotswap(model, target_rank=...)`.
///
/// The padded rows of `lora_A` and columns of `lora_B` are zero, so the model
/// computes what it did. The parameters keep their identity (their data is
/// replaced, as `param.data = padded` in Python), but their shape changes: call
/// it after loading the first adapter and before building an optimizer or
/// capturing a graph. An adapter's options then say rank `target_rank` and the
/// `alpha` that keeps its scale (`alpha * target_rank / r`; with rsLoRA
/// `alpha * sqrt(target_rank / r)`), so a saved adapter describes its padded
/// tensors and computes the same under PEFT.
///
/// Errors (`PeftError`, nothing changed): `target_rank < 1`; no LoRA layer in
/// the model; an adapter whose rank is above `target_rank` (naming the layer,
/// the adapter and its rank).
void prepare_for_hotswap(torch::nn::Module& model, int64_t target_rank);

namespace hf {

/// Replaces the weights of LoRA adapter `adapter_name` of `model` with those
/// of the PEFT adapter directory `adapter_dir` (`adapter_config.json`,
/// `adapter_model.safetensors`), in place: PEFT's `hotswap_adapter`.
///
/// The new adapter may adapt fewer layers than the loaded one (those are
/// zeroed, as PEFT does: they compute their base) but no layer it does not
/// adapt. Its rank may differ per layer, up to the rank the tensors hold
/// (pad them first with `prepare_for_hotswap`); a lower rank fills the first
/// rows of `lora_A` and columns of `lora_B` and zeroes the rest. Its scale may
/// differ (alpha, r, rsLoRA): `lora_B` is stored times `new scale / layer scale`,
/// the layer's scale and options stay, so what a captured graph computes is
/// unchanged and `save_adapter` writes a PEFT adapter that computes the new
/// adapter's outputs. Weights are cast to each adapter tensor's dtype and device.
///
/// Everything is checked before anything is written; on error (`PeftError`)
/// the model is as it was: an unknown adapter name; a layer of the adapter
/// that is no LoRA layer, or has it merged (`unmerge_adapters` first); the
/// new adapter's `peft_type` other than LORA, `use_dora` or `lora_dropout`
/// other than the loaded adapter's (as PEFT's `check_hotswap_configs_compatible`);
/// a key with no layer of the adapter; a layer given only some of its
/// weights; a shape that does not fit (naming the key); a rank above the
/// bound (naming both and the `prepare_for_hotswap` call that fixes it); NaN
/// or Inf in the new weights.
void hotswap_adapter(torch::nn::Module& model, const std::string& adapter_dir,
                     const std::string& adapter_name = kDefaultAdapterName);

/// `hotswap_adapter` with the new adapter's tensors (PEFT's file keys, with
/// or without `base_model.model.`) and config given: PEFT's
/// `hotswap_adapter_from_state_dict`. `source` names them in errors.
void hotswap_adapter_from_state_dict(torch::nn::Module& model, const AdapterTensors& tensors,
                                     const LoraConfig& config, const std::string& adapter_name = kDefaultAdapterName,
                                     const std::string& source = "<state dict>");

}  // namespace hf

}  // namespace d9d::peft
