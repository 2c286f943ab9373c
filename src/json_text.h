#pragma once
// Quoting user JSON in error messages without trusting its shape (not installed).

#include <nlohmann/json.hpp>

#include <string>

namespace d9d::detail {

/// True if `v` nests no deeper than `max_depth` levels (checked without recursing past it).
inline bool nests_within(const nlohmann::json& v, int max_depth) {
  if (!v.is_structured()) return true;
  if (max_depth == 0) return false;
  for (const auto& child : v) {
    if (!nests_within(child, max_depth - 1)) return false;
  }
  return true;
}

/// `v` as JSON text for a message: at most 80 characters, and a plain
/// description for deeply nested values (whose dump would recurse deeply).
inline std::string quote_json(const nlohmann::json& v) {
  if (!nests_within(v, 4)) return std::string("a deeply nested ") + v.type_name();
  std::string text = v.dump();
  if (text.size() > 80) text = text.substr(0, 77) + "...";
  return text;
}

}  // namespace d9d::detail
