#pragma once

// A read-only file mapped into memory, guarded against the file shrinking
// underneath it.
//
// Touching a page of a mapping beyond the end of its file raises SIGBUS,
// which kills the process (another process truncated or rewrote the file
// while it was read). While a MappedFile lives, a process-wide SIGBUS
// handler catches faults inside it: it maps zero-filled memory over the rest
// of the mapping, counts the fault, and lets the access go on. The reader
// then calls `verify()` before trusting what it read, which throws a
// `CheckpointError` naming the file. Faults anywhere else go to the handler
// that was installed before (or the default action), unchanged.

#include <cstddef>
#include <cstdint>
#include <string>

namespace d9d::model_state::detail {

class MappedFile {
 public:
  /// Maps `path` (a regular file of `size` bytes, open as `fd`) privately:
  /// writing to the memory never changes the file. Throws `CheckpointError`.
  MappedFile(int fd, size_t size, const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  char* data() const noexcept { return data_; }
  size_t size() const noexcept { return size_; }
  /// Throws `CheckpointError` if any read of the mapping found the file
  /// shorter than when it was mapped: what was read is not the file's data.
  void verify() const;

 private:
  std::string path_;
  char* data_ = nullptr;
  size_t size_ = 0;
  size_t slot_ = 0;
};

}  // namespace d9d::model_state::detail
