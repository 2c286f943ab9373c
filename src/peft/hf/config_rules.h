#pragma once

// Small helpers the readers of adapter files share.

#include <d9d/peft/errors.h>

#include <string>

namespace d9d::peft::hf::detail {

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// A `ConfigError` at `source: field` (`adapter_config.json: r: must be ...`).
[[noreturn]] inline void fail(const std::string& source, const std::string& field, const std::string& rule) {
  throw ConfigError(source + ": " + field, rule);
}

}  // namespace d9d::peft::hf::detail
