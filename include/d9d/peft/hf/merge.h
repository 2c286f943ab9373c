#pragma once

#include <d9d/model_state/io/progress.h>
#include <d9d/model_state/mapper/mapper.h>
#include <d9d/peft/hf/files.h>
#include <d9d/peft/hf/lora_merge.h>

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

namespace d9d::peft::hf {

/// How a method merges an adapter read from disk into base checkpoint
/// tensors, without model code. A method registers `plan_offline_merge`
/// (`PeftMethodRegistration`) returning one; `merge_adapter_into_checkpoint`
/// works through it alone.
class OfflineMerge {
 public:
  virtual ~OfflineMerge() = default;
  /// The base checkpoint keys the adapter changes (`layers.0.q_proj.weight`),
  /// given the keys the base holds (IA3 scales a bias only where there is one).
  virtual std::vector<std::string> target_keys(const model_state::KeySet& base_keys) const = 0;
  /// Checks the adapter against base tensor `key` before anything is written
  /// (shape, dtype, rank; NaN or Inf in the adapter unless
  /// `allow_non_finite`): `PeftError` naming the keys ("wrong base model?").
  virtual void check(const std::string& key, const at::Tensor& base, bool allow_non_finite) const = 0;
  /// The merged tensor for base tensor `key`, in its dtype. A result holding
  /// NaN or Inf (an overflow) is a `PeftError` unless `allow_non_finite`.
  virtual at::Tensor merge(const std::string& key, const at::Tensor& base, bool allow_non_finite) const = 0;
};

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
/// The adapter's `peft_type` picks the registered method's `OfflineMerge`.
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
