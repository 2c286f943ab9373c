#pragma once

// Reading the d9d JSON configs: the checks every method's parser shares, each
// throwing `ConfigError` at the field's JSON path.

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace d9d::peft::config_json {

/// `path.field` (`field` at the root).
std::string field_path(const std::string& path, const std::string& field);
/// `j` must be an object holding only `allowed` fields.
void check_object(const nlohmann::json& j, const std::string& path, const std::vector<std::string>& allowed);
const nlohmann::json& require(const nlohmann::json& j, const std::string& path, const std::string& field);
int64_t get_int(const nlohmann::json& v, const std::string& path);
double get_number(const nlohmann::json& v, const std::string& path);
bool get_bool(const nlohmann::json& v, const std::string& path);
std::string get_string(const nlohmann::json& v, const std::string& path);
/// A `"kind"` field, where `j` holds one, must be `expected` (reading a
/// method's config directly, outside `AnyPeftConfig`).
void check_kind(const nlohmann::json& j, const std::string& path, const char* expected);
/// A module-name pattern: non-empty, and a regular expression that compiles.
void validate_pattern(const std::string& pattern, const std::string& path);

/// `config`'s module_name_pattern once `validate(config)` passed: for a
/// method's constructor to validate before it compiles its pattern.
template <typename Config>
const std::string& validated_pattern(const Config& config) {
  validate(config);
  return config.module_name_pattern;
}

}  // namespace d9d::peft::config_json
