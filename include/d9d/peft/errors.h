#pragma once

#include <d9d/error.h>

#include <string>

namespace d9d::peft {

/// A PEFT method could not be applied, merged or used. The message names the
/// module path, its type and what to change.
class PeftError : public d9d::Error {
 public:
  using d9d::Error::Error;
};

/// A configuration is invalid. `path()` is the path of the offending field:
/// a JSON path (`methods[0].params.r`) or, for the options of a `d9d::nn`
/// layer, the options field (`EmbeddingOptions.padding_idx`); the message is
/// `path: rule`.
class ConfigError : public d9d::Error {
 public:
  ConfigError(const std::string& path, const std::string& rule)
      : d9d::Error(path.empty() ? rule : path + ": " + rule), path_(path) {}
  const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
};

}  // namespace d9d::peft
