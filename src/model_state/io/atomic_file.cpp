#include <d9d/model_state/io/atomic_file.h>

#include <fmt/format.h>

#include "io_checks.h"

#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

namespace d9d::model_state {

namespace {

std::string errno_text() { return std::strerror(errno); }

/// `path` under this process's temporary name: `path.tmp-PID-XXXXXXXX`.
std::string temporary_name(const std::string& path) {
  static_assert(sizeof(std::random_device::result_type) == 4, "8 hex digits");
  std::random_device rd;
  return fmt::format("{}.tmp-{}-{:08x}", path, ::getpid(), rd());
}

/// The PID in a temporary file name of ours, or -1 when `name` is not one.
/// Besides today's `X.tmp-PID-XXXXXXXX` it knows the names of older
/// versions, whose files may still lie where they were killed:
/// `X.partial-PID` (save_model_state's shards) and `.X.d9d-partial-PID`
/// (d9d-peft merge).
long partial_file_pid(const std::string& name) {
  auto digits = [](const std::string& s, size_t from, size_t to) -> long {
    if (from >= to || to - from > 9) return -1;
    for (size_t i = from; i < to; ++i) {
      if (s[i] < '0' || s[i] > '9') return -1;
    }
    return std::stol(s.substr(from, to - from));
  };
  for (const std::string marker : {".d9d-partial-", ".partial-"}) {
    const size_t at = name.rfind(marker);
    if (at != std::string::npos && at > 0) {
      const long pid = digits(name, at + marker.size(), name.size());
      if (pid > 0) return pid;
    }
  }
  const size_t at = name.rfind(".tmp-");
  if (at == std::string::npos || at == 0) return -1;
  const size_t dash = name.find('-', at + 5);
  if (dash == std::string::npos || name.size() - dash - 1 != 8) return -1;
  for (size_t i = dash + 1; i < name.size(); ++i) {
    if (!std::isxdigit(static_cast<unsigned char>(name[i]))) return -1;
  }
  return digits(name, at + 5, dash);
}

/// The file `path` stands for: `X` for a temporary `X.tmp-PID-XXXXXXXX` (a
/// `PendingFiles` file written through an `AtomicFile` has two such
/// suffixes), so that messages name the file the caller asked for.
std::string intended_path(std::string path) {
  for (;;) {
    const size_t slash = path.rfind('/');
    const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
    const size_t at = path.rfind(".tmp-");
    if (at == std::string::npos || partial_file_pid(name) <= 0 || name.rfind(".tmp-") == std::string::npos) {
      return path;
    }
    path.erase(at);
  }
}

}  // namespace

size_t remove_stale_partial_files(const std::string& dir) {
  size_t removed = 0;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(dir.empty() ? "." : dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const long pid = partial_file_pid(name);
    if (pid <= 0 || pid == static_cast<long>(::getpid())) continue;
    // kill(pid, 0) fails with ESRCH only when no such process exists.
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;
    std::error_code rm;
    if (it->is_regular_file(rm) && std::filesystem::remove(it->path(), rm)) ++removed;
  }
  return removed;
}

// ---------------------------------------------------------------- AtomicFile

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  detail::check_path_text(path_, "AtomicFile");
  remove_stale_partial_files(std::filesystem::path(path_).parent_path().string());
  tmp_ = temporary_name(path_);
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd_ < 0) throw CheckpointError(fmt::format("{}: cannot create {}: {}", path_, tmp_, errno_text()));
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* data, size_t n) {
  if (fd_ < 0) throw CheckpointError(fmt::format("{}: written to after commit()", path_));
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd_, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw CheckpointError(fmt::format("{}: write failed: {}", intended_path(path_), errno_text()));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void AtomicFile::commit() {
  if (fd_ < 0) throw CheckpointError(fmt::format("{}: commit() called twice", path_));
  if (::fsync(fd_) != 0) {
    throw CheckpointError(fmt::format("{}: fsync failed: {}", intended_path(path_), errno_text()));
  }
  ::close(fd_);
  fd_ = -1;
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    throw CheckpointError(fmt::format("{}: cannot rename {} into place: {}", path_, tmp_, errno_text()));
  }
  committed_ = true;
}

void write_file_atomically(const std::string& path, const std::string& bytes) {
  AtomicFile file(path);
  file.write(bytes.data(), bytes.size());
  file.commit();
}

// -------------------------------------------------------------- PendingFiles

PendingFiles::PendingFiles(std::string dir, bool created_dir) : dir_(std::move(dir)), created_dir_(created_dir) {}

PendingFiles::~PendingFiles() {
  if (committed_) return;
  for (size_t i = placed_; i < files_.size(); ++i) ::unlink(files_[i].temporary.c_str());
  std::error_code ec;
  if (created_dir_) std::filesystem::remove(dir_, ec);  // only if empty again
}

std::string PendingFiles::add(const std::string& name) {
  detail::check_path_text(dir_, "PendingFiles");
  detail::check_file_name(name, dir_, "the file name");
  // Two files of one write under one name: the second would replace the first.
  for (const File& file : files_) {
    if (std::filesystem::path(file.final_path).filename() == name) {
      throw CheckpointError(fmt::format("{}: two files of this write are both named {}; each needs its own name",
                                        dir_, detail::printable(name)));
    }
  }
  const std::string final_path = (std::filesystem::path(dir_) / name).string();
  files_.push_back({temporary_name(final_path), final_path});
  return files_.back().temporary;
}

void PendingFiles::commit() {
  for (; placed_ < files_.size(); ++placed_) {
    const File& file = files_[placed_];
    if (::rename(file.temporary.c_str(), file.final_path.c_str()) != 0) {
      const std::string why = errno_text();
      for (size_t rest = placed_; rest < files_.size(); ++rest) ::unlink(files_[rest].temporary.c_str());
      throw CheckpointError(fmt::format("{}: cannot rename {} to {}: {} ({} of {} files were put in place)", dir_,
                                        file.temporary, std::filesystem::path(file.final_path).filename().string(),
                                        why, placed_, files_.size()));
    }
  }
  committed_ = true;
}

}  // namespace d9d::model_state
