#pragma once

#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/mapper/mapper.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

namespace d9d::model_state {

/// Tensors by key, read on demand: a checkpoint on disk or a dict in memory.
class StateSource {
 public:
  virtual ~StateSource() = default;
  virtual KeySet keys() const = 0;
  virtual bool contains(const std::string& key) const = 0;
  /// The tensor under `key` (CPU); throws `CheckpointError` naming the source if absent.
  virtual at::Tensor read(const std::string& key) const = 0;
  /// `read` without a copy where the source can (a view of a mapped file):
  /// its data is the source's only once `release(key)` returns, which throws
  /// `CheckpointError` if the file was cut short while it was read.
  virtual at::Tensor read_view(const std::string& key) const { return read(key); }
  /// The tensor's size in bytes, without reading it.
  virtual uint64_t nbytes(const std::string& key) const = 0;
  /// The tensor's shape and dtype without its data: a tensor on the meta
  /// device (undefined where `read` gives an undefined one). Files answer
  /// from their headers; the default reads the tensor.
  virtual at::Tensor read_meta(const std::string& key) const;
  /// The file holding `key` (reads are ordered by it).
  virtual std::string location(const std::string& /*key*/) const { return describe(); }
  /// Lets go of memory the source holds for `key` once it has been used;
  /// throws `CheckpointError` if what `read_view` gave was not the file's data.
  virtual void release(const std::string& /*key*/) const {}
  /// What this source is, for messages: a path.
  virtual std::string describe() const = 0;
};

using SourcePtr = std::shared_ptr<const StateSource>;

/// Opens a checkpoint, by what `path` is:
/// - a directory with `model.safetensors.index.json` (sharded, Hugging Face
///   layout) or `model.safetensors`;
/// - a `*.safetensors.index.json` index, or a `*.safetensors` file;
/// - a `torch.save` dict of tensors (`*.pt`, `*.pth`, `*.bin`, or any zip
///   archive written by torch.save).
/// Every file is validated on open; errors are `CheckpointError`s naming the
/// file and key.
SourcePtr open_checkpoint(const std::string& path);

/// A source over an in-memory state dict.
SourcePtr state_dict_source(StateDict tensors, std::string name = "<state dict>");

/// The `model.safetensors.index.json` of a sharded checkpoint.
struct SafetensorsIndex {
  std::map<std::string, std::string> weight_map;  // key -> shard file name
  std::optional<uint64_t> total_size;             // metadata.total_size, if given
};

/// Parses and validates an index: a JSON object with a `weight_map` of
/// key -> shard file name (plain names in the index's directory) and an
/// optional `metadata` object. Throws `CheckpointError` naming `source`.
SafetensorsIndex parse_safetensors_index(const std::string& text, const std::string& source);

/// The index JSON as Hugging Face writes it (sorted keys, 2-space indent).
std::string dump_safetensors_index(const SafetensorsIndex& index);

}  // namespace d9d::model_state
