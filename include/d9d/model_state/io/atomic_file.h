#pragma once

#include <d9d/model_state/io/checkpoint_error.h>

#include <cstddef>
#include <string>

namespace d9d::model_state {

// A file written atomically goes under a temporary name in its final
// directory, `NAME.tmp-PID-XXXXXXXX` (PID: the writer's process, X: 8 random
// hex digits), and is renamed into place once complete, so a reader never
// sees half a file and a crash leaves an old file intact.

/// One file written atomically: created under a temporary name beside `path`,
/// then `fsync`ed and renamed onto `path` by `commit()`. Destroyed without a
/// commit (an exception on the way), it removes the temporary file and leaves
/// whatever was at `path` untouched. Errors are `CheckpointError`s naming
/// `path` and the operating system's reason.
///
/// ```
/// d9d::model_state::AtomicFile file("out/notes.txt");
/// file.write(text.data(), text.size());
/// file.commit();
/// ```
class AtomicFile {
 public:
  /// Creates the temporary file (after removing stale ones of killed writers
  /// from the directory: `remove_stale_partial_files`).
  explicit AtomicFile(std::string path);
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();

  /// Appends `n` bytes to the temporary file.
  void write(const void* data, size_t n);
  /// Flushes the temporary file to disk and renames it onto `path()`.
  void commit();

  const std::string& path() const noexcept { return path_; }
  /// Where the bytes go until `commit()`.
  const std::string& temporary_path() const noexcept { return tmp_; }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

/// Writes `bytes` to `path` atomically (an `AtomicFile`).
void write_file_atomically(const std::string& path, const std::string& bytes);

/// Removes, from directory `dir`, the temporary files this library's writers
/// leave when their process is killed mid-write (`NAME.tmp-PID-XXXXXXXX`,
/// `NAME.partial-PID`, `.NAME.d9d-partial-PID`) whose process PID no longer
/// runs on this machine. Every `AtomicFile` calls it for its directory, so a
/// killed merge or save is cleaned up by the next write to the same place.
/// Returns how many files it removed.
size_t remove_stale_partial_files(const std::string& dir);

}  // namespace d9d::model_state
