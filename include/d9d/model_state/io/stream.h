#pragma once

#include <d9d/model_state/io/progress.h>
#include <d9d/model_state/io/source.h>
#include <d9d/model_state/mapper/mapper.h>

#include <functional>
#include <map>
#include <string>

namespace torch::nn {
class Module;
}

namespace d9d::model_state {

/// Streams `source` through `mapper`: for each group, reads its inputs,
/// applies the mapper and hands the outputs to `consume`, then lets go of
/// the group's memory. Only one group is held at a time. A group input the
/// source lacks is a `CheckpointError` naming the key.
void read_model_state(const StateSource& source, const ModelStateMapper& mapper,
                      const std::function<void(StateDict)>& consume, const ProgressCallback& progress = {});

struct SaveOptions {
  /// Largest shard in bytes (Hugging Face's default, "5GB"); 0 writes one file.
  uint64_t shard_size = 5'000'000'000ull;
  /// `__metadata__` of every file written.
  std::map<std::string, std::string> metadata = {{"format", "pt"}};
  ProgressCallback progress = stderr_progress();
};

/// Writes the state of `module`, mapped through `mapper` (module keys in,
/// checkpoint keys out), to the directory `dir` in the Hugging Face layout:
/// `model.safetensors` when it fits one shard, else
/// `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`.
///
/// Every file is written under a temporary name; shards are renamed into
/// place only once all are complete, the index last, so a crash leaves any
/// old checkpoint in `dir` readable. Files of an old checkpoint that the new
/// one does not use are removed at the end. Every module key must be read by
/// some mapper group (use `identity_mapper_from_module` to save as is).
///
/// Errors are `CheckpointError`s naming the path and the operating system's
/// reason: `dir` cannot be created, a file cannot be written or renamed, or
/// an old file cannot be removed.
void save_model_state(const std::string& dir, const ModelStateMapper& mapper, const torch::nn::Module& module,
                      SaveOptions options = {});

}  // namespace d9d::model_state
