#pragma once

#include <d9d/peft/hf/module_selector.h>
#include <d9d/peft/oft/options.h>

#include <nlohmann/json.hpp>

#include <optional>
#include <string>

namespace d9d::peft::hf {

/// Hugging Face PEFT 0.21's `OFTConfig` (adapter_config.json with
/// `"peft_type": "OFT"`), on linear layers. Exactly one of `r` and
/// `oft_block_size` is non-zero (PEFT's rule); a value that does not divide a
/// layer's `in_features` is adjusted per layer as PEFT adjusts it. Fields PEFT
/// has that this library does not implement must hold their defaults
/// (`bias` "none", `fan_in_fan_out` false, `layers_to_transform`,
/// `layers_pattern`, `modules_to_save` null); anything else is a
/// `ConfigError` naming the field.
///
/// ```
/// d9d::peft::hf::OFTConfig config;
/// config.target_modules.names = {"q_proj", "v_proj"};
/// config.oft_block_size = 4;
/// d9d::peft::OFT oft(config);
/// auto mapper = d9d::peft::inject_peft_and_freeze(oft, *model);
/// ```
struct OFTConfig {
  int64_t r = 0;
  int64_t oft_block_size = 32;
  double module_dropout = 0.0;
  bool coft = false;
  double eps = 6e-5;
  bool block_share = false;
  bool use_cayley_neumann = true;
  int64_t num_cayley_neumann_terms = 5;
  bool init_weights = true;
  ModuleSelector target_modules;
  ModuleSelector exclude_modules;
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> task_type;

  /// The options every targeted layer gets.
  OFTParameters parameters() const;
  /// The options for a qualified module name, or nothing if not targeted.
  std::optional<OFTParameters> select(const std::string& qualified_name) const;
};

/// Parses and validates `adapter_config.json` content; `source` names the file in errors.
OFTConfig parse_oft_config(const nlohmann::json& j, const std::string& source);
/// Checks a config built in code as `parse_oft_config` checks a file.
void validate(const OFTConfig& config, const std::string& source = "OFTConfig");
/// The config as PEFT 0.21's `save_pretrained` writes it: every field, keys sorted, 2-space indent.
std::string dump_oft_config(const OFTConfig& config);

}  // namespace d9d::peft::hf

namespace d9d::peft {

/// OFT in d9d's JSON, usable inside a stack and in the trainer's config:
/// `{"kind":"oft","module_name_pattern":".*(q|v)_proj","params":{"oft_block_size":4}}`.
/// `params` fields: `r` or `oft_block_size` (one of them, non-zero; the
/// other is 0 when left out), `coft` (false), `eps` (6e-5), `block_share`
/// (false), `use_cayley_neumann` (true), `num_cayley_neumann_terms` (5),
/// `module_dropout` (0; no effect, as in PEFT 0.21) and `init_weights` (true:
/// a fresh adapter is a no-op). The pattern is an ECMAScript regex that must
/// match the whole qualified name.
struct OFTConfig {
  static constexpr const char* kind = "oft";
  std::string module_name_pattern;
  OFTParameters params;
};

/// Throws `ConfigError` naming `path`-relative fields; the pattern is compiled here.
void validate(const OFTConfig& config, const std::string& path = "");
/// The same layers as PEFT's config: the pattern as a regex.
hf::OFTConfig to_peft_config(const OFTConfig& config);

void to_json(nlohmann::json& j, const OFTConfig& config);
void to_json(nlohmann::ordered_json& j, const OFTConfig& config);
void from_json(const nlohmann::json& j, OFTConfig& config);

}  // namespace d9d::peft
