#pragma once

// LoRA's part of the offline merge: a LoRA adapter file's tensors merged into
// base weights without model code (`d9d-peft merge`).

#include <d9d/peft/hf/config.h>
#include <d9d/peft/hf/files.h>

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

namespace d9d::peft::hf {

class OfflineMerge;

/// The module paths a LoRA adapter's tensors adapt (`layers.0.attention.q_proj`),
/// sorted. A key that is no LoRA weight this library merges
/// (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`,
/// `lora_embedding_A`, `lora_embedding_B`) is a `PeftError` naming it.
std::vector<std::string> adapted_module_paths(const AdapterTensors& tensors, const std::string& source = "<adapter>");

/// The weight of the module at `module_path` after merging the adapter into
/// `base_weight` (its `<module_path>.weight`), without any model code. The
/// kind follows the keys the adapter holds for that path:
/// - `lora_A.weight` `[r, in]` + `lora_B.weight` `[out, r]`: `W + s * B @ A`;
/// - the same plus `lora_magnitude_vector` `[out]` (DoRA):
///   `m / ||W + s * B @ A||_row * (W + s * B @ A)`;
/// - `lora_embedding_A` `[r, V]` + `lora_embedding_B` `[d, r]`: `W + s * (B @ A)^T`
///   (with a magnitude `[d]`: DoRA per column).
/// `s` is the scale `config.select(module_path)` gives (`alpha / r`, or
/// `alpha / sqrt(r)` with rsLoRA) times `extra_scale`. The arithmetic is
/// `d9d::peft::lora::merged_weight`, the in-model merge's own. Shapes and the
/// rank are checked against the base and the config; errors are `PeftError`s
/// naming the key ("wrong base model?"). A merged weight holding NaN or Inf
/// is refused (naming the cause: the adapter, the base, or an overflow), as
/// PEFT's `safe_merge` does, unless `allow_non_finite`.
///
/// ```
/// auto adapter = d9d::peft::hf::read_adapter_files("adapters/my-lora");
/// auto config = d9d::peft::hf::parse_lora_config(adapter.config, adapter.config_path);
/// at::Tensor w = d9d::peft::hf::merge_lora_weight(base->read("layers.0.q_proj.weight"),
///                                                 "layers.0.q_proj", adapter.tensors, config);
/// ```
at::Tensor merge_lora_weight(const at::Tensor& base_weight, const std::string& module_path,
                             const AdapterTensors& adapter, const LoraConfig& config, double extra_scale = 1.0,
                             bool allow_non_finite = false);

/// LoRA's `OfflineMerge` for an adapter read by `read_adapter_files`.
std::unique_ptr<OfflineMerge> plan_lora_offline_merge(const AdapterFiles& files, double extra_scale);

}  // namespace d9d::peft::hf
