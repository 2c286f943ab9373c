#pragma once

// Small helpers the readers of adapter files share.

#include <d9d/peft/errors.h>
#include <d9d/peft/pattern.h>

#include <fmt/format.h>

#include <optional>
#include <utility>
#include <vector>

#include <string>

namespace d9d::peft::hf::detail {

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// A `ConfigError` at `source: field` (`adapter_config.json: r: must be ...`).
[[noreturn]] inline void fail(const std::string& source, const std::string& field, const std::string& rule) {
  throw ConfigError(source + ": " + field, rule);
}

/// PEFT's get_pattern_key (`rank_pattern`, `alpha_pattern`): the first key
/// whose regex `(.*\.)?(key)` matches the whole name.
template <typename T>
std::optional<T> pattern_value(const std::vector<std::pair<std::string, T>>& patterns, const std::string& name) {
  for (const auto& [key, value] : patterns) {
    if (key == name || Pattern("(.*\\.)?(" + key + ")", key).full_match(name)) return value;
  }
  return std::nullopt;
}

/// A `rank_pattern`/`alpha_pattern` key must compile as PEFT uses it: `(.*\.)?(key)`.
inline void check_pattern_key(const std::string& key, const std::string& source, const std::string& field) {
  if (auto why = Pattern::syntax_error("(.*\\.)?(" + key + ")"); !why.empty()) {
    fail(source, field, fmt::format("the key is not a valid pattern as PEFT uses it, (.*\\.)?(KEY): {}", why));
  }
}

/// `s` as a regex matching itself (a module name as a `rank_pattern` key).
inline std::string regex_escape(const std::string& s) {
  static const std::string specials = R"(\^$.|?*+()[]{})";
  std::string out;
  for (char c : s) {
    if (specials.find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

}  // namespace d9d::peft::hf::detail
