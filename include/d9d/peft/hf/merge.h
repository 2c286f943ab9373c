#pragma once

#include <d9d/model_state/io/progress.h>
#include <d9d/model_state/mapper/mapper.h>
#include <d9d/peft/hf/config.h>

#include <string>
#include <vector>

namespace d9d::peft::hf {

/// An adapter file's tensors under their file keys, with or without the
/// `base_model.model.` prefix (`base_model.model.layers.0.q_proj.lora_A.weight`).
using AdapterTensors = model_state::StateDict;

/// A Hugging Face PEFT adapter read from disk, without a model.
struct AdapterFiles {
  std::string dir;
  LoraConfig config;
  AdapterTensors tensors;
  std::string weights_path;  // adapter_model.safetensors (or .bin)
};

/// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`
/// (`adapter_model.bin` where there is no safetensors file). Throws
/// `PeftError` when the directory is no adapter, `ConfigError` for the config,
/// `CheckpointError` for the weights.
AdapterFiles read_adapter_files(const std::string& dir);

/// The module paths an adapter's tensors adapt (`layers.0.attention.q_proj`),
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
/// - `lora_embedding_A` `[r, V]` + `lora_embedding_B` `[d, r]`: `W + s * (B @ A)^T`.
/// `s` is the scale `config.select(module_path)` gives (`alpha / r`, or
/// `alpha / sqrt(r)` with rsLoRA) times `extra_scale`. Computed in float32
/// (float64 for a float64 base and for DoRA's norm), returned in the base's
/// dtype. Shapes and the rank are checked against the base and the config;
/// errors are `PeftError`s naming the key ("wrong base model?").
///
/// ```
/// auto adapter = d9d::peft::hf::read_adapter_files("adapters/my-lora");
/// at::Tensor w = d9d::peft::hf::merge_lora_weight(base->read("layers.0.q_proj.weight"),
///                                                 "layers.0.q_proj", adapter.tensors, adapter.config);
/// ```
/// A merged weight holding NaN or Inf is refused (`PeftError` naming the adapter
/// key or the base key, and the cause: NaN/Inf in the adapter, in the base, or
/// an overflow), as PEFT's `safe_merge` does, unless `allow_non_finite`.
at::Tensor merge_lora_weight(const at::Tensor& base_weight, const std::string& module_path,
                             const AdapterTensors& adapter, const LoraConfig& config, double extra_scale = 1.0,
                             bool allow_non_finite = false);

struct MergeOptions {
  /// Multiplies every adapter's delta (0.5 merges half of it; for DoRA it multiplies `s`).
  double scale = 1.0;
  /// Write merged weights even where they hold NaN or Inf (refused by default,
  /// before anything is written where the adapter itself holds them).
  bool allow_non_finite = false;
  model_state::ProgressCallback progress = model_state::stderr_progress();
};

/// Merges the adapter in `adapter_dir` into the checkpoint `base` (a
/// `model.safetensors` file or directory, a sharded directory or index, or a
/// `torch.save` dict) and writes the result to the directory `out`, in the
/// base's layout: `out/model.safetensors` for a single file (also for a
/// `torch.save` base), the same shard names and a rewritten index for a
/// sharded one. Tensors the adapter does not touch are copied bit for bit.
///
/// Everything is checked before anything is written: every adapted module's
/// `<path>.weight` must exist in the base with a fitting shape (else a
/// `PeftError` naming the key, "wrong base model?"). The base is streamed
/// shard by shard (only one shard is held in memory); every output file is
/// written under a temporary name and renamed into place only once all are
/// complete, so a failed merge leaves nothing new in `out`. `out` must not be
/// the base's own directory. NaN or Inf in an adapter tensor is refused before
/// anything is written, and a merged weight that overflows to Inf is refused
/// before its file is renamed into place (`options.allow_non_finite` writes
/// them anyway). Progress is reported per tensor, stage "merge".
///
/// ```
/// d9d::peft::hf::merge_adapter_into_checkpoint("llama-7b", "adapters/my-lora", "llama-7b-merged");
/// ```
void merge_adapter_into_checkpoint(const std::string& base, const std::string& adapter_dir, const std::string& out,
                                   const MergeOptions& options);
/// The same with `MergeOptions{scale, false, progress}`.
void merge_adapter_into_checkpoint(const std::string& base, const std::string& adapter_dir, const std::string& out,
                                   double scale = 1.0,
                                   model_state::ProgressCallback progress = model_state::stderr_progress());

}  // namespace d9d::peft::hf
