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

namespace detail {
class MappedFile;
}

/// A memory-mapped safetensors file, validated when opened.
///
/// The mapping is guarded: a file truncated or replaced while it is read
/// (another process rewriting a checkpoint) is a `CheckpointError` naming the
/// file, where an unguarded mapping kills the process with SIGBUS. For that,
/// the first open installs a process-wide SIGBUS handler that handles faults
/// inside these mappings and passes every other SIGBUS to the handler that
/// was there before (or the default action).
class SafetensorsFile {
 public:
  /// Maps and validates `path`; throws `CheckpointError`.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const noexcept { return path_; }
  const SafetensorsHeader& header() const noexcept { return header_; }
  KeySet keys() const;
  bool contains(const std::string& key) const { return header_.tensors.count(key) > 0; }
  /// A CPU tensor of its own holding what is stored under `key`: read and
  /// verified (`CheckpointError` if absent or if the file no longer holds
  /// its bytes).
  at::Tensor get(const std::string& key) const;
  /// Zero-copy: a view of the mapping where the data is aligned for its
  /// dtype (a copy otherwise), copy-on-write (writing to it never changes the
  /// file), keeping the mapping alive. Its data is the file's only once
  /// `verify()` (or `release(key)`) returns after it was read: a file cut
  /// short reads as zeros until then.
  at::Tensor view(const std::string& key) const;
  /// Throws `CheckpointError` if any read of this file found it shorter than
  /// when it was opened.
  void verify() const;
  /// Every tensor of the file (`get`).
  StateDict load_all() const;
  /// `verify()`, then drops the pages of `key`'s data from this process's
  /// memory (they are read again from the file on the next access). Only for
  /// data no tensor still in use was modified through.
  void release(const std::string& key) const;

 private:
  SafetensorsFile() = default;
  const SafetensorsEntry& entry(const std::string& key) const;
  std::string path_;
  SafetensorsHeader header_;
  std::shared_ptr<detail::MappedFile> mapping_;
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
