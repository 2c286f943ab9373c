#pragma once

// PEFT's file form of the LoRA factors of grouped expert layers (target_parameters).

#include <d9d/model_state/mapper/mapper.h>
#include <d9d/peft/hf/target_parameters.h>
#include <d9d/peft/lora/grouped_linear.h>

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace torch::nn {
class Module;
}

namespace d9d::peft::hf::detail {

/// One grouped layer holding the adapter, and where PEFT keeps its factors.
struct GroupedSlot {
  std::string layer;  ///< the layer's qualified name, `model.layers.0.mlp.experts.gate_up_proj`
  /// PEFT's key prefix without `base_model.model.`: the parent's path with
  /// `base_layer.` once per targeted sibling registered after it
  /// (`model.layers.0.mlp.experts.base_layer.`).
  std::string prefix;
  const LoRAGroupedLinearAdapterImpl* adapter = nullptr;
};

/// The grouped layers holding `adapter_name`, in registration order.
std::vector<GroupedSlot> grouped_slots(const torch::nn::Module& module, const std::string& adapter_name);

/// The file's `lora_A.weight` `[r·E, ·]` and `lora_B.weight` `[·, r·E]` of one slot.
std::pair<at::Tensor, at::Tensor> to_peft_factors(const GroupedSlot& slot, const ExpertOptions& options);

/// The layer's `[E, in, r]` and `[E, r, out]` from the file's factors (checked:
/// shapes, convention, finite values); `PeftError` naming `source` and the keys.
std::pair<at::Tensor, at::Tensor> from_peft_factors(const GroupedSlot& slot, const at::Tensor& a, const at::Tensor& b,
                                                    const ExpertOptions& options, const std::string& source,
                                                    const std::string& key_a, const std::string& key_b);

}  // namespace d9d::peft::hf::detail
