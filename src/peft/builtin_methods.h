#pragma once

// The methods this library ships, as the registry lists them. Adding a method
// means writing its `<method>_registration()` (next to its code) and adding
// one line to `builtin_methods()` in registry.cpp.

#include <d9d/peft/full_tune/config.h>
#include <d9d/peft/ia3/config.h>
#include <d9d/peft/loha/config.h>
#include <d9d/peft/lokr/config.h>
#include <d9d/peft/lora/config.h>
#include <d9d/peft/oft/config.h>
#include <d9d/peft/registry.h>
#include <d9d/peft/vera/config.h>

#include <nlohmann/json.hpp>

#include <memory>
#include <string>

namespace d9d::peft {

PeftMethodRegistration lora_registration();
PeftMethodRegistration full_tune_registration();
PeftMethodRegistration stack_registration();
PeftMethodRegistration ia3_registration();
PeftMethodRegistration loha_registration();
PeftMethodRegistration oft_registration();
PeftMethodRegistration lokr_registration();
PeftMethodRegistration vera_registration();

/// The d9d JSON readers (the `"kind"` field already checked by the caller).
LoRAConfig parse_lora_config_json(const nlohmann::json& j, const std::string& path);
FullTuneConfig parse_full_tune_config_json(const nlohmann::json& j, const std::string& path);
IA3Config parse_ia3_config_json(const nlohmann::json& j, const std::string& path);
LoHaConfig parse_loha_config_json(const nlohmann::json& j, const std::string& path);
OFTConfig parse_oft_config_json(const nlohmann::json& j, const std::string& path);
LoKrConfig parse_lokr_config_json(const nlohmann::json& j, const std::string& path);
VeraConfig parse_vera_config_json(const nlohmann::json& j, const std::string& path);

/// A registration's d9d-config functions, for a config struct `Config` with
/// `validate(config, path)` and `to_json(ordered_json&, config)`, and a method
/// `Method` constructible from it.
template <typename Config, typename Method>
PeftMethodRegistration d9d_config_registration(Config (*parse)(const nlohmann::json&, const std::string&)) {
  PeftMethodRegistration r;
  r.kind = Config::kind;
  r.parse = [parse](const nlohmann::json& j, const std::string& path) -> AnyPeftConfig { return parse(j, path); };
  r.write = [](const AnyPeftConfig& c, nlohmann::ordered_json& out) { to_json(out, c.get<Config>()); };
  r.validate = [](const AnyPeftConfig& c, const std::string& path) { validate(c.get<Config>(), path); };
  r.make_method = [](const AnyPeftConfig& c) -> std::unique_ptr<PeftMethodBase> {
    return std::make_unique<Method>(Method::from_config(c.get<Config>()));
  };
  return r;
}

}  // namespace d9d::peft
