#pragma once

#include <d9d/peft/hf/module_selector.h>
#include <d9d/peft/vera/options.h>

#include <nlohmann/json.hpp>

#include <optional>
#include <string>

namespace d9d::peft::hf {

/// Hugging Face PEFT's `VeraConfig` (adapter_config.json with `"peft_type": "VERA"`),
/// on linear layers. `fan_in_fan_out` must be false and `bias` `"none"`;
/// `layers_to_transform`, `layers_pattern` and `modules_to_save` must hold
/// their defaults (null), as for LoRA; any other field PEFT's VeraConfig does
/// not have is a `ConfigError` naming the field.
///
/// ```
/// d9d::peft::hf::VeraConfig config;
/// config.target_modules.names = {"q_proj", "v_proj"};
/// config.r = 64;
/// d9d::peft::Vera vera(config);
/// auto mapper = d9d::peft::inject_peft_and_freeze(vera, *model);
/// ```
struct VeraConfig {
  int64_t r = 256;
  ModuleSelector target_modules;
  int64_t projection_prng_key = 0;
  bool save_projection = true;
  double vera_dropout = 0.0;
  double d_initial = 0.1;
  bool init_weights = true;
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> task_type;

  /// The options for a qualified module name (without projections), or nothing if not targeted.
  std::optional<VeraParameters> select(const std::string& qualified_name) const;
};

/// Parses and validates `adapter_config.json` content; `source` names the file in errors.
VeraConfig parse_vera_config(const nlohmann::json& j, const std::string& source);
/// Checks a config built in code as `parse_vera_config` checks a file.
void validate(const VeraConfig& config, const std::string& source = "VeraConfig");
/// The config as PEFT 0.21's `save_pretrained` writes it: every field, keys sorted, 2-space indent.
std::string dump_vera_config(const VeraConfig& config);

}  // namespace d9d::peft::hf

namespace d9d::peft {

/// VeRA in d9d's JSON, usable inside a stack and in the trainer's config:
/// `{"kind":"vera","module_name_pattern":".*(q|v)_proj","params":{"r":64}}`.
/// `params` fields: `r` (required), `projection_prng_key` (default 0),
/// `save_projection` (true), `vera_dropout` (0), `d_initial` (0.1) and
/// `init_weights` (true: a fresh adapter is a no-op). The pattern is an
/// ECMAScript regex that must match the whole qualified name.
struct VeraConfig {
  static constexpr const char* kind = "vera";
  std::string module_name_pattern;
  VeraParameters params;
};

/// Throws `ConfigError` naming `path`-relative fields; the pattern is compiled here.
void validate(const VeraConfig& config, const std::string& path = "");
/// The same layers as PEFT's config: the pattern as a regex.
hf::VeraConfig to_peft_config(const VeraConfig& config);

void to_json(nlohmann::json& j, const VeraConfig& config);
void to_json(nlohmann::ordered_json& j, const VeraConfig& config);
void from_json(const nlohmann::json& j, VeraConfig& config);

}  // namespace d9d::peft
