#pragma once

#include <nlohmann/json_fwd.hpp>

#include <string>

namespace d9d::peft {

/// Trains every parameter of the modules whose qualified name fully matches
/// `module_name_pattern`. JSON: `{"kind":"full_tune","module_name_pattern":".*norm.*"}`.
struct FullTuneConfig {
  static constexpr const char* kind = "full_tune";
  std::string module_name_pattern;
};

void validate(const FullTuneConfig& config, const std::string& path = "");

void to_json(nlohmann::json& j, const FullTuneConfig& config);
void to_json(nlohmann::ordered_json& j, const FullTuneConfig& config);
void from_json(const nlohmann::json& j, FullTuneConfig& config);

}  // namespace d9d::peft
