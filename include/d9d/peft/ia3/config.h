#pragma once

#include <d9d/peft/hf/module_selector.h>
#include <d9d/peft/ia3/options.h>

#include <nlohmann/json.hpp>

#include <string>

#include <optional>
#include <string>

namespace d9d::peft::hf {

/// Hugging Face PEFT's `IA3Config` (adapter_config.json with `"peft_type": "IA3"`):
/// which linear layers get an (IA)³ vector and which of them are feed-forward
/// (their input is scaled, not their output). Fields PEFT has that this
/// library does not implement must hold their defaults (`fan_in_fan_out`,
/// `modules_to_save`); anything else is a `ConfigError` naming the field.
///
/// ```
/// d9d::peft::hf::IA3Config config;
/// config.target_modules.names = {"q_proj", "v_proj", "down_proj"};
/// config.feedforward_modules.names = {"down_proj"};
/// d9d::peft::IA3 ia3(config);
/// auto mapper = d9d::peft::inject_peft_and_freeze(ia3, *model);
/// ```
struct IA3Config {
  /// A module matches a name when its qualified name equals it or ends with
  /// "." + it; a regex must match the whole name (PEFT's rule).
  ModuleSelector target_modules;
  ModuleSelector exclude_modules;
  /// Feed-forward layers among the targets: a name matches when the
  /// qualified name ends with it (PEFT's plain suffix rule), a regex the whole
  /// name. Listed names must be among `target_modules`' names.
  ModuleSelector feedforward_modules;
  /// PEFT's `init_ia3_weights`: vectors start at ones (false: normal(0, 1)).
  bool init_ia3_weights = true;
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> task_type;

  /// The options for a qualified module name, or nothing if not targeted.
  std::optional<IA3Parameters> select(const std::string& qualified_name) const;
};

/// Parses and validates `adapter_config.json` content; `source` names the file in errors.
IA3Config parse_ia3_config(const nlohmann::json& j, const std::string& source);
/// Checks a config built in code as `parse_ia3_config` checks a file.
void validate(const IA3Config& config, const std::string& source = "IA3Config");
/// The config as PEFT 0.21's `save_pretrained` writes it: every field, keys sorted, 2-space indent.
std::string dump_ia3_config(const IA3Config& config);

}  // namespace d9d::peft::hf

namespace d9d::peft {

/// IA3 in d9d's JSON, usable inside a stack and in the trainer's config:
/// `{"kind":"ia3","module_name_pattern":".*(k|v|down)_proj","params":{"feedforward_pattern":".*down_proj"}}`.
/// The patterns are ECMAScript regexes that must match the whole qualified
/// name; `params` and `feedforward_pattern` are optional (none feed-forward).
/// Vectors start at ones.
struct IA3Config {
  static constexpr const char* kind = "ia3";
  std::string module_name_pattern;
  /// The feed-forward layers (input scaled) among those matched; empty: none.
  std::string feedforward_pattern;
};

/// Throws `ConfigError` naming `path`-relative fields; the patterns are compiled here.
void validate(const IA3Config& config, const std::string& path = "");
/// The same layers as PEFT's config: the patterns as regexes.
hf::IA3Config to_peft_config(const IA3Config& config);

void to_json(nlohmann::json& j, const IA3Config& config);
void to_json(nlohmann::ordered_json& j, const IA3Config& config);
void from_json(const nlohmann::json& j, IA3Config& config);

}  // namespace d9d::peft
