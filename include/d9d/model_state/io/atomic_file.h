#pragma once

#include <d9d/model_state/io/checkpoint_error.h>

#include <cstddef>
#include <string>
#include <vector>

namespace d9d::model_state {

// Every file this library writes goes under a temporary name in its final
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

/// Files of one directory written under temporary names and renamed into
/// place together, once all are complete (the shards of a checkpoint and
/// its index). `add(name)` gives the temporary path to write `name` to;
/// `commit()` renames every file in the order added, so the last one added
/// (the index) appears last. Destroyed without a successful commit, it
/// removes every temporary file not yet in place, and the directory too when
/// `created_dir` says the caller created it and it is empty again, so a
/// failed write leaves nothing new behind.
///
/// ```
/// d9d::model_state::PendingFiles pending(out_dir, /*created_dir=*/created);
/// save_safetensors(pending.add("model.safetensors"), tensors);
/// pending.commit();
/// ```
class PendingFiles {
 public:
  PendingFiles(std::string dir, bool created_dir);
  PendingFiles(const PendingFiles&) = delete;
  PendingFiles& operator=(const PendingFiles&) = delete;
  ~PendingFiles();

  /// The temporary path (in the directory) to write the file `name` to.
  std::string add(const std::string& name);
  /// Renames the files into place in the order added. When a rename fails,
  /// removes the temporary files not yet in place and throws a
  /// `CheckpointError` naming the directory, both names, the reason and how
  /// many files were put in place (those stay).
  void commit();

 private:
  struct File {
    std::string temporary, final_path;
  };
  std::string dir_;
  bool created_dir_;
  std::vector<File> files_;
  size_t placed_ = 0;  // files_[0, placed_) are in place
  bool committed_ = false;
};

/// Removes, from directory `dir`, the temporary files this library's writers
/// leave when their process is killed mid-write and whose process PID no
/// longer runs on this machine. It recognises today's `NAME.tmp-PID-XXXXXXXX`
/// and, for files left by older versions, `NAME.partial-PID` (their
/// `save_model_state` shards) and `.NAME.d9d-partial-PID` (their
/// `d9d-peft merge`). Every `AtomicFile` calls it for its directory, so a
/// killed merge or save is cleaned up by the next write to the same place.
/// Returns how many files it removed.
size_t remove_stale_partial_files(const std::string& dir);

}  // namespace d9d::model_state
