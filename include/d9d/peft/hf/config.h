#pragma once

#include <d9d/peft/hf/module_selector.h>
#include <d9d/peft/lora/options.h>

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace d9d::peft::hf {

/// The part of a Hugging Face PEFT `LoraConfig` (adapter_config.json) this
/// library computes with. Every other field must hold its default: a field
/// set to something this library does not implement (`fan_in_fan_out: true`,
/// `bias: "all"`, `modules_to_save`, ...) is a `ConfigError` naming the field
/// and value, never silently ignored.
struct LoraConfig {
  int64_t r = 8;
  double lora_alpha = 8;
  double lora_dropout = 0.0;
  ModuleSelector target_modules;
  ModuleSelector exclude_modules;
  /// PEFT's `target_parameters`: names of 3-D expert parameters, which this
  /// library holds as grouped layers (`d9d::nn::GroupedLinear`, whose `.weight`
  /// is the parameter). An entry selects the grouped layers whose qualified
  /// name equals it or ends with "." + it; grouped layers are then selected by
  /// these alone, never by `target_modules`. The adapter file stores such a
  /// layer's factors in PEFT's form (see `ExpertStorage`). Requires
  /// `lora_dropout` 0 and no DoRA, as PEFT does.
  std::vector<std::string> target_parameters;
  bool use_rslora = false;
  bool use_dora = false;
  /// `init_lora_weights`: true (Default), false (Random), "gaussian", "olora",
  /// "pissa" or "pissa_niter_<n>" (PiSSA with `pissa_niter` n).
  LoRAInit init = LoRAInit::Default;
  int64_t pissa_niter = 0;
  /// Per-module rank and alpha, in file order; a key matches a module name
  /// as PEFT's `get_pattern_key` does: the regex `(.*\.)?(key)` over the whole name.
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> task_type;

  /// The layer options for a qualified module name, or nothing if the config
  /// does not target it.
  std::optional<LoRAParameters> select(const std::string& qualified_name) const;
  /// The layer options for a grouped expert layer named by `target_parameters`
  /// (rank and alpha patterns matched against its full name), or nothing.
  std::optional<LoRAParameters> select_parameter(const std::string& qualified_name) const;
};

/// Parses and validates `adapter_config.json` content; `source` names the
/// file in errors (`adapter_config.json: fan_in_fan_out: true is not supported ...`).
/// Every regular expression (`target_modules` as a string, the keys of
/// `rank_pattern` and `alpha_pattern`) is compiled here.
LoraConfig parse_lora_config(const nlohmann::json& j, const std::string& source);

/// Checks a config built in code as `parse_lora_config` checks a file (every
/// regular expression compiled): `ConfigError` naming `source` and the field.
void validate(const LoraConfig& config, const std::string& source = "LoraConfig");

/// The config as PEFT 0.21's `save_pretrained` writes it: every field, keys
/// sorted, 2-space indent.
std::string dump_lora_config(const LoraConfig& config);

}  // namespace d9d::peft::hf
