#pragma once
// The trainer's training checkpoint: what `--resume` needs to continue a
// fine-tuning run exactly where it stopped.
//
// <out>/checkpoint/
//   trainable.safetensors  every trainable parameter (requires_grad), under its model key
//   optimizer.pt           the AdamW state (torch::save)
//   trainer_state.json     the next step, the last loss, the random states, the run config
//
// It is written whole into <out>/checkpoint.new/ and swapped in with renames
// (the previous one goes to <out>/checkpoint.old/ until the new one is in
// place), so a crash at any point leaves the old or the new checkpoint
// complete; `recover_checkpoint` tidies up what such a crash leaves.

#include "training.h"

#include <d9d/model_state/mapper/mapper.h>

#include <nlohmann/json.hpp>

#include <torch/nn/module.h>

#include <filesystem>
#include <optional>
#include <string>

namespace trainer {

/// `<out>/checkpoint`.
std::filesystem::path checkpoint_dir(const std::filesystem::path& out);

/// Finishes what a run killed while swapping checkpoints left: puts the old
/// checkpoint back if the new one never got in place, removes the old one if
/// it did, and removes an incomplete `checkpoint.new`. Returns a line saying
/// what it did, or nothing when there was nothing to do.
std::optional<std::string> recover_checkpoint(const std::filesystem::path& out);

/// Removes the checkpoint (and any leftovers of a swap).
void remove_checkpoint(const std::filesystem::path& out);

/// Writes the checkpoint of `model`'s trainable parameters, `state` and
/// `config` (the run config's JSON) to `<out>/checkpoint`, replacing the
/// previous one only once the new one is complete.
void save_checkpoint(const std::filesystem::path& out, const torch::nn::Module& model, const TrainingState& state,
                     const nlohmann::ordered_json& config);

/// Writes every trainable parameter of `model` (requires_grad), under its
/// model key, to the safetensors file `file`: what `load_trainable` reads.
void save_trainable(const std::filesystem::path& file, const torch::nn::Module& model);

struct Checkpoint {
  TrainingState state;           // `origin` names the checkpoint directory
  nlohmann::ordered_json config;  // the run config it was saved with
  std::filesystem::path trainable_file;
};

/// Reads `<out>/checkpoint` (not yet the parameters: `load_trainable`).
/// Throws a runtime_error naming the path when there is none or it is damaged.
Checkpoint read_checkpoint(const std::filesystem::path& out);

/// Copies the tensors of `file` into `model`'s trainable parameters. Strict:
/// the file holds exactly the trainable parameters, each with the model's
/// shape and dtype, else nothing is copied and the error names the key and
/// the file.
void load_trainable(const std::filesystem::path& file, torch::nn::Module& model);

/// Where two configs first differ: the field's path and both values as JSON
/// ("absent" where a side lacks the field).
struct ConfigDifference {
  std::string path;
  std::string saved, now;
};

/// The first field, in `now`'s order, whose value differs between `saved`
/// and `now` (`peft.params.dropout`; `a[2]` inside arrays), or nothing when
/// they are equal.
std::optional<ConfigDifference> first_difference(const nlohmann::ordered_json& saved,
                                                 const nlohmann::ordered_json& now, const std::string& path = "");

}  // namespace trainer
