#pragma once

#include <d9d/model_state/io/atomic_file.h>
#include <d9d/model_state/io/checkpoint_error.h>
#include <d9d/model_state/mapper/mapper.h>

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace d9d::model_state {

/// Where one tensor lies in a safetensors file.
struct SafetensorsEntry {
  at::ScalarType dtype;
  std::string dtype_name;  // as written: "F32", "BF16", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data section
  uint64_t end = 0;
};

/// A validated safetensors header.
struct SafetensorsHeader {
  std::map<std::string, SafetensorsEntry> tensors;
  std::map<std::string, std::string> metadata;
  uint64_t data_offset = 0;  // 8 + header length
};

/// Parses and validates the header of a safetensors file held in `bytes`
/// (the whole file, or at least its first 8 + header-length bytes when
/// `file_size` says how long the file is). Checks everything the format
/// promises: the length prefix, JSON, no duplicate keys, known dtypes,
/// non-negative shapes, offsets that tile the data section exactly (in
/// bounds, contiguous, not overlapping) and sizes that match shape x dtype,
/// `__metadata__` as strings. Throws `CheckpointError` naming `source`.
SafetensorsHeader parse_safetensors_header(const uint8_t* bytes, size_t size, uint64_t file_size,
                                           const std::string& source);

/// The safetensors name of a dtype (`"F32"`), or throws for one the format lacks.
std::string safetensors_dtype_name(at::ScalarType dtype);

/// A memory-mapped safetensors file. Tensors are views of the mapping where
/// their data is aligned for the dtype (copy-on-write: writing to them never
/// changes the file), copies otherwise; they keep the mapping alive.
class SafetensorsFile {
 public:
  /// Maps and validates `path`; throws `CheckpointError`.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const noexcept { return path_; }
  const SafetensorsHeader& header() const noexcept { return header_; }
  KeySet keys() const;
  bool contains(const std::string& key) const { return header_.tensors.count(key) > 0; }
  /// The tensor stored under `key` (CPU); throws `CheckpointError` if absent.
  at::Tensor get(const std::string& key) const;
  /// Every tensor of the file.
  StateDict load_all() const;
  /// Drops the pages of `key`'s data from this process's memory (they are
  /// read again from the file on the next access). Only for data no tensor
  /// still in use was modified through.
  void release(const std::string& key) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  SafetensorsHeader header_;
  std::shared_ptr<void> mapping_;
  size_t size_ = 0;
};

/// Writes `tensors` (any device; made contiguous on the CPU) to `path` as
/// safetensors: 8-byte aligned data, keys in the reference writer's order,
/// optional `__metadata__`. The file is written under a temporary name in
/// the same directory and renamed into place (an `AtomicFile`), so a crash
/// never leaves a half-written `path` (an old file there stays intact until
/// the rename).
void save_safetensors(const std::string& path, const StateDict& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace d9d::model_state
