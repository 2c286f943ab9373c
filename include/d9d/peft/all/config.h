#pragma once

#include <d9d/peft/full_tune/config.h>
#include <d9d/peft/lora/config.h>

#include <nlohmann/json_fwd.hpp>

#include <string>
#include <variant>
#include <vector>

namespace d9d::peft {

struct AnyPeftConfig;

/// Several methods applied in order (and merged in reverse order). JSON:
/// `{"kind":"stack","methods":[...]}`; stacks nest.
struct PeftStackConfig {
  static constexpr const char* kind = "stack";
  std::vector<AnyPeftConfig> methods;
};

/// Any PEFT configuration, discriminated in JSON by its `"kind"` field.
///
/// ```
/// auto config = nlohmann::json::parse(text).get<d9d::peft::AnyPeftConfig>();
/// auto method = d9d::peft::peft_method_from_config(config);
/// ```
struct AnyPeftConfig {
  using Variant = std::variant<LoRAConfig, FullTuneConfig, PeftStackConfig>;

  AnyPeftConfig() = default;
  AnyPeftConfig(LoRAConfig config) : value(std::move(config)) {}
  AnyPeftConfig(FullTuneConfig config) : value(std::move(config)) {}
  AnyPeftConfig(PeftStackConfig config) : value(std::move(config)) {}

  /// `"lora"`, `"full_tune"` or `"stack"`.
  std::string kind() const;

  Variant value;
};

void validate(const PeftStackConfig& config, const std::string& path = "");
void validate(const AnyPeftConfig& config, const std::string& path = "");

void to_json(nlohmann::json& j, const PeftStackConfig& config);
void to_json(nlohmann::ordered_json& j, const PeftStackConfig& config);
void from_json(const nlohmann::json& j, PeftStackConfig& config);
void to_json(nlohmann::json& j, const AnyPeftConfig& config);
void to_json(nlohmann::ordered_json& j, const AnyPeftConfig& config);
void from_json(const nlohmann::json& j, AnyPeftConfig& config);

/// Parses and validates a JSON document; errors are `ConfigError`s naming the
/// JSON path. `source` (a file name, say) prefixes syntax errors.
AnyPeftConfig parse_peft_config(const std::string& json_text, const std::string& source = "<string>");

/// The compact JSON the Python original's `model_dump_json()` writes, with its
/// field order: `{"kind":"lora","module_name_pattern":"...","params":{"r":8,...}}`.
std::string dump_peft_config(const AnyPeftConfig& config);

}  // namespace d9d::peft
