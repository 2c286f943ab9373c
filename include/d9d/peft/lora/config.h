#pragma once

#include <d9d/peft/lora/options.h>

#include <nlohmann/json_fwd.hpp>

#include <string>

namespace d9d::peft {

/// LoRA on every adaptable layer whose qualified name fully matches
/// `module_name_pattern` (ECMAScript regular expression). JSON:
/// `{"kind":"lora","module_name_pattern":".*_proj","params":{"r":8,"alpha":16,"dropout":0.05}}`.
/// `params` may also hold `"use_rslora": true` and `"use_dora": true`
/// (written only when set, so the Python original's output is unchanged).
struct LoRAConfig {
  static constexpr const char* kind = "lora";
  std::string module_name_pattern;
  LoRAParameters params;
};

/// Throws `ConfigError` naming `path`-relative fields (`params.r: must be >= 1`);
/// the pattern is compiled here.
void validate(const LoRAConfig& config, const std::string& path = "");

void to_json(nlohmann::json& j, const LoRAParameters& params);
void to_json(nlohmann::ordered_json& j, const LoRAParameters& params);
void from_json(const nlohmann::json& j, LoRAParameters& params);
void to_json(nlohmann::json& j, const LoRAConfig& config);
void to_json(nlohmann::ordered_json& j, const LoRAConfig& config);
void from_json(const nlohmann::json& j, LoRAConfig& config);

}  // namespace d9d::peft
