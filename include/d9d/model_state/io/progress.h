#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace d9d::model_state {

/// How far a long load or save has come.
struct ProgressInfo {
  std::string stage;  // "load", "check", "save"
  size_t done = 0;    // groups done
  size_t total = 0;
  uint64_t bytes_done = 0;
  uint64_t bytes_total = 0;
  double elapsed_seconds = 0;
  bool finished = false;
};

using ProgressCallback = std::function<void(const ProgressInfo&)>;

/// A live progress line on stderr (tensors, MB, MB/s, ETA) redrawn at most
/// ten times a second when stderr is a terminal; otherwise one summary line
/// when an operation took over two seconds.
ProgressCallback stderr_progress();

/// Reports nothing.
inline ProgressCallback no_progress() { return {}; }

}  // namespace d9d::model_state
