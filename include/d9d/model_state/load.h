#pragma once

#include <d9d/error.h>
#include <d9d/model_state/io/progress.h>
#include <d9d/model_state/mapper/mapper.h>

#include <c10/core/Device.h>

#include <optional>
#include <string>
#include <vector>

namespace torch::nn {
class Module;
}

namespace d9d::model_state {

/// Implemented by modules that hold state no checkpoint of the original model
/// contains, such as PEFT adapter weights. Loading does not report those keys
/// as missing.
class FreshState {
 public:
  virtual ~FreshState() = default;
  /// Keys relative to the module, e.g. `lora_A.weight`.
  virtual std::vector<std::string> fresh_state_keys() const = 0;
  /// Called by `load_model_state` once a load has written `loaded_keys`
  /// (relative to this module; only when some key below it was loaded), so
  /// state derived from loaded weights (DoRA's magnitude) follows them.
  virtual void after_state_loaded(const KeySet& loaded_keys) { (void)loaded_keys; }
};

/// The fresh-state keys of every module in the tree, fully qualified.
KeySet fresh_state_keys(const torch::nn::Module& module);

/// A key whose tensor does not fit the model's.
struct MismatchedKey {
  std::string key;
  std::vector<int64_t> expected_shape;
  std::vector<int64_t> got_shape;
  std::string expected_dtype;
  std::string got_dtype;
};

/// What a load did and what it could not do.
struct LoadReport {
  /// Model keys that no mapper output provides (adapter weights excluded;
  /// keys provided with the wrong shape or dtype are in `mismatched_keys`).
  std::vector<std::string> missing_keys;
  /// Keys the mapper needs from the source that the source lacks.
  std::vector<std::string> missing_source_keys;
  /// Source keys that no mapper group reads.
  std::vector<std::string> unexpected_keys;
  /// Keys the mapper produces that the model does not have.
  std::vector<std::string> unknown_output_keys;
  /// Keys whose shape or dtype differ from the model's.
  std::vector<MismatchedKey> mismatched_keys;
  /// Model keys that were written.
  std::vector<std::string> loaded_keys;

  bool ok() const {
    return missing_keys.empty() && missing_source_keys.empty() && unexpected_keys.empty() &&
           unknown_output_keys.empty() && mismatched_keys.empty();
  }
  /// A readable account of every problem, one per line.
  std::string to_string() const;
};

/// A load that cannot be made. Thrown by a strict load whose state does not
/// fit the model (`report()` says how; the model is left untouched), and when
/// the module cannot be moved to `LoadOptions::device` or a fitting tensor
/// cannot be copied into it (the message says so and what was loaded).
class StateLoadError : public d9d::Error {
 public:
  StateLoadError(const std::string& message, LoadReport report)
      : d9d::Error(message), report_(std::move(report)) {}
  const LoadReport& report() const noexcept { return report_; }

 private:
  LoadReport report_;
};

struct LoadOptions {
  /// Strict: any missing, unexpected or mismatched key throws
  /// `StateLoadError` before a single tensor is written. Not strict: load what
  /// fits and return the report.
  bool strict = true;
  /// Moves the module there first, so the state streams straight onto it.
  std::optional<c10::Device> device = std::nullopt;
  /// Called as groups load (by default a progress line on stderr).
  ProgressCallback progress = stderr_progress();
};

class StateSource;

/// Streams a state from `source` into `module` through `mapper`.
///
/// Each mapper group whose inputs are all in the source is read, applied,
/// and its outputs copied into the module's parameters and buffers (on
/// their device, without recording gradients); then its memory is let go,
/// so the peak is about the largest group, not the checkpoint. Keys are
/// checked before any data is read, and shapes and dtypes in a first pass
/// that only maps (views of a memory-mapped file cost nothing), so a strict
/// load that fails has written nothing.
///
/// ```
/// auto mapper = d9d::peft::inject_peft_and_freeze(lora, *model);
/// d9d::model_state::load_model_state("checkpoints/base", *mapper, *model);
/// ```
LoadReport load_model_state(const StateSource& source, const ModelStateMapper& mapper, torch::nn::Module& module,
                            LoadOptions options = {});

/// `load_model_state(*open_checkpoint(path), ...)`: a safetensors file, a
/// sharded checkpoint directory or index, or a torch.save dict.
LoadReport load_model_state(const std::string& path, const ModelStateMapper& mapper, torch::nn::Module& module,
                            LoadOptions options = {});

/// Loads a flat in-memory state dict into `module` through `mapper`, as
/// `load_model_state` does.
///
/// ```
/// auto mapper = d9d::peft::inject_peft_and_freeze(lora, *model);
/// d9d::model_state::load_state_dict(*model, checkpoint, *mapper);
/// ```
LoadReport load_state_dict(torch::nn::Module& module, const StateDict& state_dict,
                           const ModelStateMapper& mapper, LoadOptions options = {});

/// Loads a state dict whose keys already match the module's.
LoadReport load_state_dict(torch::nn::Module& module, const StateDict& state_dict, LoadOptions options = {});

}  // namespace d9d::model_state
