#pragma once

// The methods this library knows, by the names configs use for them: a d9d
// JSON `kind` and a Hugging Face PEFT `peft_type`, as the Python original's
// `_PEFT_CONFIG_MAP`. Parsing, writing and building a method all go through
// here, so adding a method is its folder plus one registration (see
// docs/adding-a-method.md).

#include <d9d/peft/all/config.h>
#include <d9d/peft/base.h>

#include <nlohmann/json_fwd.hpp>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace torch::nn {
class Module;
}

namespace d9d::peft {

namespace hf {
struct SaveAdapterOptions;
struct AdapterFiles;
class OfflineMerge;
}  // namespace hf

/// What a method registers. Every function may be empty where the method has
/// no such form (FullTune has no PEFT adapter file; a PEFT-only method has no
/// d9d `kind`).
struct PeftMethodRegistration {
  /// The d9d JSON `"kind"` (`"lora"`), or empty.
  std::string kind;
  /// Reads the d9d JSON object at `path` (its `"kind"` already checked),
  /// validating fully; `ConfigError` naming the field.
  std::function<AnyPeftConfig(const nlohmann::json& j, const std::string& path)> parse;
  /// Writes the config in the Python original's field order.
  std::function<void(const AnyPeftConfig& config, nlohmann::ordered_json& out)> write;
  std::function<void(const AnyPeftConfig& config, const std::string& path)> validate;
  std::function<std::unique_ptr<PeftMethodBase>(const AnyPeftConfig& config)> make_method;

  /// The Hugging Face PEFT `peft_type` (`"LORA"`), or empty.
  std::string peft_type;
  /// Builds the method an `adapter_config.json` describes, adding adapter
  /// `adapter_name`; `source` names the file in `ConfigError`s.
  std::function<std::unique_ptr<PeftMethodBase>(const nlohmann::json& adapter_config, const std::string& source,
                                                const std::string& adapter_name)>
      load_hf_config;
  /// The `adapter_config.json` text describing adapter `adapter_name` of `model`.
  std::function<std::string(const torch::nn::Module& model, const std::string& adapter_name,
                            const hf::SaveAdapterOptions& options)>
      write_hf_config;
  /// Plans merging an adapter directory into a base checkpoint without model
  /// code (`d9d-peft merge`), its deltas multiplied by `scale`.
  std::function<std::unique_ptr<hf::OfflineMerge>(const hf::AdapterFiles& files, double scale)> plan_offline_merge;
};

/// Adds a method to the registry. A `kind` or `peft_type` already taken is a `PeftError`.
void register_peft_method(PeftMethodRegistration registration);

/// The method registered for d9d `kind`; `ConfigError` at `path` listing the known kinds.
const PeftMethodRegistration& method_for_kind(const std::string& kind, const std::string& path = "kind");

/// The method registered for a PEFT `peft_type`; `ConfigError` naming `source`
/// and listing the supported types.
const PeftMethodRegistration& method_for_peft_type(const std::string& peft_type, const std::string& source);

/// The registered d9d kinds and PEFT types, in registration order.
std::vector<std::string> registered_kinds();
std::vector<std::string> registered_peft_types();

}  // namespace d9d::peft
