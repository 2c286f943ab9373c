#pragma once

#include <d9d/peft/hf/module_selector.h>
#include <d9d/peft/lokr/options.h>

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace d9d::peft::hf {

/// Hugging Face PEFT's `LoKrConfig` (adapter_config.json with `"peft_type": "LOKR"`),
/// on linear and Conv2d layers. `use_effective_conv2d` puts a factored `w2`
/// of a Conv2d kernel larger than 1×1 in PEFT's CP form (`lokr_t2`); on
/// other layers it has no effect, as in PEFT. Fields PEFT
/// has that this library does not implement must hold their defaults
/// (`layers_to_transform`, `layers_pattern`, `modules_to_save`, as for LoRA);
/// anything else is a `ConfigError` naming the field.
///
/// ```
/// d9d::peft::hf::LoKrConfig config;
/// config.target_modules.names = {"q_proj", "v_proj"};
/// config.r = 4;
/// config.alpha = 8;
/// d9d::peft::LoKr lokr(config);
/// auto mapper = d9d::peft::inject_peft_and_freeze(lokr, *model);
/// ```
struct LoKrConfig {
  int64_t r = 8;
  double alpha = 8;
  double rank_dropout = 0.0;
  double module_dropout = 0.0;
  bool rank_dropout_scale = false;
  bool use_effective_conv2d = false;
  bool decompose_both = false;
  int64_t decompose_factor = -1;
  /// `true`, `false` or `"lycoris"` in the file.
  LoKrInit init_weights = LoKrInit::kPeft;
  ModuleSelector target_modules;
  ModuleSelector exclude_modules;
  /// Per-module rank and alpha, in file order; a key matches a module name
  /// as PEFT's `get_pattern_key` does: the regex `(.*\.)?(key)` over the whole name.
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> task_type;

  /// The options for a qualified module name, or nothing if not targeted.
  std::optional<LoKrParameters> select(const std::string& qualified_name) const;
};

/// Parses and validates `adapter_config.json` content; `source` names the file in errors.
LoKrConfig parse_lokr_config(const nlohmann::json& j, const std::string& source);
/// Checks a config built in code as `parse_lokr_config` checks a file.
void validate(const LoKrConfig& config, const std::string& source = "LoKrConfig");
/// The config as PEFT 0.21's `save_pretrained` writes it: every field, keys sorted, 2-space indent.
std::string dump_lokr_config(const LoKrConfig& config);

}  // namespace d9d::peft::hf

namespace d9d::peft {

/// LoKr in d9d's JSON, usable inside a stack and in the trainer's config:
/// `{"kind":"lokr","module_name_pattern":".*(q|v)_proj","params":{"r":4,"alpha":8}}`.
/// `params` fields: `r` and `alpha` (required), `rank_dropout`,
/// `module_dropout` (default 0), `rank_dropout_scale`, `decompose_both`
/// (default false), `decompose_factor` (default -1) and `init_weights`
/// (true, the default: a fresh adapter is a no-op; false; or `"lycoris"`).
/// The pattern is an ECMAScript regex that must match the whole qualified name.
struct LoKrConfig {
  static constexpr const char* kind = "lokr";
  std::string module_name_pattern;
  LoKrParameters params;
};

/// Throws `ConfigError` naming `path`-relative fields; the pattern is compiled here.
void validate(const LoKrConfig& config, const std::string& path = "");
/// The same layers as PEFT's config: the pattern as a regex.
hf::LoKrConfig to_peft_config(const LoKrConfig& config);

void to_json(nlohmann::json& j, const LoKrConfig& config);
void to_json(nlohmann::ordered_json& j, const LoKrConfig& config);
void from_json(const nlohmann::json& j, LoKrConfig& config);

}  // namespace d9d::peft
