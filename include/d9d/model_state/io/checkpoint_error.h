#pragma once

#include <d9d/error.h>

namespace d9d::model_state {

/// A checkpoint file, index or directory is malformed, unreadable or cannot
/// be written. The message names the path, the key where one is at fault, and
/// the operating system's reason where it gave one.
class CheckpointError : public d9d::Error {
 public:
  using d9d::Error::Error;
};

}  // namespace d9d::model_state
