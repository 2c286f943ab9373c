#pragma once
// Checks shared by the mapper implementations (not installed).

#include <d9d/model_state/mapper/mapper.h>

#include <fmt/format.h>

namespace d9d::model_state::detail {

inline KeySet keys_of(const StateDict& dict) {
  KeySet keys;
  for (const auto& item : dict) keys.insert(item.first);
  return keys;
}

/// Throws unless `group` holds exactly `expected`: `Rename: expected a group with keys {a}, got {b}`.
inline void expect_keys(const char* mapper, const StateDict& group, const KeySet& expected) {
  const KeySet got = keys_of(group);
  if (got != expected) {
    throw MapperError(fmt::format("{}: expected a group with keys {}, got {}", mapper, format_keys(expected),
                                  format_keys(got)));
  }
}

}  // namespace d9d::model_state::detail
