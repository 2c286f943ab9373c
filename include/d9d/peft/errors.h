#pragma once

#include <stdexcept>
#include <string>

namespace d9d::peft {

/// A PEFT method could not be applied or merged. The message names the
/// module path, its type and what to change.
class PeftError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A configuration is invalid. `path()` is the JSON path of the offending
/// field (`methods[0].params.r`); the message is `path: rule`.
class ConfigError : public std::invalid_argument {
 public:
  ConfigError(const std::string& path, const std::string& rule)
      : std::invalid_argument(path.empty() ? rule : path + ": " + rule), path_(path) {}
  const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
};

}  // namespace d9d::peft
