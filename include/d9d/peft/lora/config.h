#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>

namespace d9d::peft {

/// Hyperparameters of LoRA layers.
struct LoRAParameters {
  /// Rank of the low-rank matrices; >= 1.
  int64_t r = 8;
  /// Scale numerator: the adapter output is multiplied by `alpha / r`; >= 1.
  int64_t alpha = 16;
  /// Dropout probability on the adapter's input; in [0, 1).
  double dropout = 0.0;
};

/// LoRA on every linear layer whose qualified name fully matches
/// `module_name_pattern` (ECMAScript regular expression). JSON:
/// `{"kind":"lora","module_name_pattern":".*_proj","params":{"r":8,"alpha":16,"dropout":0.05}}`.
struct LoRAConfig {
  static constexpr const char* kind = "lora";
  std::string module_name_pattern;
  LoRAParameters params;
};

/// Throws `ConfigError` naming `path`-relative fields (`params.r: must be >= 1`).
void validate(const LoRAConfig& config, const std::string& path = "");

void to_json(nlohmann::json& j, const LoRAParameters& params);
void to_json(nlohmann::ordered_json& j, const LoRAParameters& params);
void from_json(const nlohmann::json& j, LoRAParameters& params);
void to_json(nlohmann::json& j, const LoRAConfig& config);
void to_json(nlohmann::ordered_json& j, const LoRAConfig& config);
void from_json(const nlohmann::json& j, LoRAConfig& config);

}  // namespace d9d::peft
