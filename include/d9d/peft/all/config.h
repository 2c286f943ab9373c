#pragma once

#include <d9d/peft/full_tune/config.h>
#include <d9d/peft/lora/config.h>

#include <nlohmann/json_fwd.hpp>

#include <memory>
#include <string>
#include <type_traits>
#include <typeindex>
#include <vector>

namespace d9d::peft {

class AnyPeftConfig;

/// Several methods applied in order (and merged in reverse order). JSON:
/// `{"kind":"stack","methods":[...]}`; stacks nest.
struct PeftStackConfig {
  static constexpr const char* kind = "stack";
  std::vector<AnyPeftConfig> methods;
};

/// Any PEFT configuration of a registered method (see `registry.h`),
/// discriminated in JSON by its `"kind"` field. Holds a copy of a method's
/// config struct (one with a `static constexpr const char* kind`).
///
/// ```
/// auto config = d9d::peft::parse_peft_config(text, "peft.json");
/// if (const auto* lora = config.get_if<d9d::peft::LoRAConfig>()) std::cout << lora->params.r();
/// auto method = d9d::peft::peft_method_from_config(config);
/// ```
class AnyPeftConfig {
 public:
  AnyPeftConfig() = default;
  template <typename Config, typename = std::enable_if_t<!std::is_same_v<std::decay_t<Config>, AnyPeftConfig>>,
            typename = decltype(std::decay_t<Config>::kind)>
  AnyPeftConfig(Config config)  // NOLINT: every method's config converts implicitly, as into a variant
      : kind_(std::decay_t<Config>::kind),
        type_(typeid(std::decay_t<Config>)),
        value_(std::make_shared<const std::decay_t<Config>>(std::move(config))) {}

  /// `"lora"`, `"full_tune"`, `"stack"`, ... (empty for a default-constructed config).
  const std::string& kind() const noexcept { return kind_; }
  bool empty() const noexcept { return !value_; }

  /// The config if it is a `Config`, else null.
  template <typename Config>
  const Config* get_if() const noexcept {
    return value_ && type_ == std::type_index(typeid(Config)) ? static_cast<const Config*>(value_.get()) : nullptr;
  }
  /// The config as a `Config`; `ConfigError` naming both kinds if it is another.
  template <typename Config>
  const Config& get() const {
    if (const Config* c = get_if<Config>()) return *c;
    throw_wrong_kind(Config::kind);
  }

 private:
  [[noreturn]] void throw_wrong_kind(const char* wanted) const;

  std::string kind_;
  std::type_index type_ = typeid(void);
  std::shared_ptr<const void> value_;
};

void validate(const PeftStackConfig& config, const std::string& path = "");
/// Validates through the method registered for the config's kind.
void validate(const AnyPeftConfig& config, const std::string& path = "");

void to_json(nlohmann::json& j, const PeftStackConfig& config);
void to_json(nlohmann::ordered_json& j, const PeftStackConfig& config);
void from_json(const nlohmann::json& j, PeftStackConfig& config);
void to_json(nlohmann::json& j, const AnyPeftConfig& config);
void to_json(nlohmann::ordered_json& j, const AnyPeftConfig& config);
void from_json(const nlohmann::json& j, AnyPeftConfig& config);

/// Parses and validates a JSON document; errors are `ConfigError`s naming the
/// JSON path (every regular expression is compiled here). `source` (a file
/// name, say) prefixes syntax errors.
AnyPeftConfig parse_peft_config(const std::string& json_text, const std::string& source = "<string>");

/// The compact JSON the Python original's `model_dump_json()` writes, with its
/// field order: `{"kind":"lora","module_name_pattern":"...","params":{"r":8,...}}`.
std::string dump_peft_config(const AnyPeftConfig& config);

}  // namespace d9d::peft
