#include "config_json.h"

#include <d9d/peft/errors.h>
#include <d9d/peft/pattern.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../json_text.h"

#include <algorithm>
#include <cmath>

namespace d9d::peft::config_json {

using nlohmann::json;

std::string field_path(const std::string& path, const std::string& field) {
  return path.empty() ? field : path + "." + field;
}

void check_object(const json& j, const std::string& path, const std::vector<std::string>& allowed) {
  if (!j.is_object()) {
    throw ConfigError(path, fmt::format("expected an object, got {} {}", j.type_name(), d9d::detail::quote_json(j)));
  }
  for (const auto& item : j.items()) {
    if (std::find(allowed.begin(), allowed.end(), item.key()) == allowed.end()) {
      throw ConfigError(field_path(path, item.key()),
                        fmt::format("unknown field; allowed fields are {}", fmt::join(allowed, ", ")));
    }
  }
}

const json& require(const json& j, const std::string& path, const std::string& field) {
  auto it = j.find(field);
  if (it == j.end()) throw ConfigError(field_path(path, field), "field required");
  return *it;
}

int64_t get_int(const json& v, const std::string& path) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && std::floor(d) == d && std::abs(d) < 9.0e18) return static_cast<int64_t>(d);
  }
  throw ConfigError(path, fmt::format("expected an integer, got {}", d9d::detail::quote_json(v)));
}

double get_number(const json& v, const std::string& path) {
  if (v.is_number()) return v.get<double>();
  throw ConfigError(path, fmt::format("expected a number, got {}", d9d::detail::quote_json(v)));
}

bool get_bool(const json& v, const std::string& path) {
  if (v.is_boolean()) return v.get<bool>();
  throw ConfigError(path, fmt::format("expected true or false, got {}", d9d::detail::quote_json(v)));
}

std::string get_string(const json& v, const std::string& path) {
  if (v.is_string()) return v.get<std::string>();
  throw ConfigError(path, fmt::format("expected a string, got {}", d9d::detail::quote_json(v)));
}

void check_kind(const json& j, const std::string& path, const char* expected) {
  if (!j.is_object()) return;
  auto it = j.find("kind");
  if (it == j.end()) return;
  if (!it->is_string() || it->get<std::string>() != expected) {
    throw ConfigError(field_path(path, "kind"),
                      fmt::format("expected \"{}\", got {}", expected, d9d::detail::quote_json(*it)));
  }
}

void validate_pattern(const std::string& pattern, const std::string& path) {
  if (pattern.empty()) throw ConfigError(path, "must not be empty (it must fully match qualified module names)");
  static_cast<void>(Pattern(pattern, path));  // throws ConfigError(path, ...) for an invalid pattern
}

}  // namespace d9d::peft::config_json
