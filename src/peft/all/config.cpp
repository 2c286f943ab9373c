// AnyPeftConfig and the stack's config: parsing and writing go through the
// registry by `kind`.
#include <d9d/peft/all/config.h>
#include <d9d/peft/all/method.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/registry.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <type_traits>

#include "../../json_text.h"
#include "../builtin_methods.h"
#include "../config_json.h"

namespace d9d::peft {

using nlohmann::json;
using config_json::field_path;

namespace {

AnyPeftConfig parse_any(const json& j, const std::string& path) {
  if (!j.is_object()) {
    throw ConfigError(path, fmt::format("expected an object, got {} {}", j.type_name(), d9d::detail::quote_json(j)));
  }
  auto it = j.find("kind");
  const std::string kind_path = field_path(path, "kind");
  if (it == j.end()) {
    const auto kinds = registered_kinds();
    throw ConfigError(kind_path, fmt::format("field required: one of \"{}\"", fmt::join(kinds, "\", \"")));
  }
  const std::string kind = it->is_string() ? it->get<std::string>() : d9d::detail::quote_json(*it);
  return method_for_kind(kind, kind_path).parse(j, path);
}

PeftStackConfig parse_stack(const json& j, const std::string& path) {
  using namespace config_json;
  check_object(j, path, {"kind", "methods"});
  const json& methods = require(j, path, "methods");
  const std::string methods_path = field_path(path, "methods");
  if (!methods.is_array()) {
    throw ConfigError(methods_path, fmt::format("expected a list, got {}", d9d::detail::quote_json(methods)));
  }
  PeftStackConfig c;
  for (size_t i = 0; i < methods.size(); ++i) {
    c.methods.push_back(parse_any(methods[i], fmt::format("{}[{}]", methods_path, i)));
  }
  validate(c, path);
  return c;
}

template <typename Json>
void write_any(Json& j, const AnyPeftConfig& c);

template <typename Json>
void write_stack(Json& j, const PeftStackConfig& c) {
  j = Json::object();
  j["kind"] = PeftStackConfig::kind;
  j["methods"] = Json::array();
  for (const auto& method : c.methods) {
    Json item;
    write_any(item, method);
    j["methods"].push_back(std::move(item));
  }
}

void check_not_empty(const AnyPeftConfig& c, const std::string& path) {
  if (c.empty()) throw ConfigError(path, "an empty AnyPeftConfig; assign a method's config (LoRAConfig, ...) to it");
}

template <typename Json>
void write_any(Json& j, const AnyPeftConfig& c) {
  check_not_empty(c, "");
  nlohmann::ordered_json ordered;
  method_for_kind(c.kind()).write(c, ordered);
  if constexpr (std::is_same_v<Json, nlohmann::ordered_json>) {
    j = std::move(ordered);
  } else {
    j = Json(ordered);  // basic_json converts between its specialisations
  }
}

}  // namespace

void AnyPeftConfig::throw_wrong_kind(const char* wanted) const {
  throw ConfigError("kind", fmt::format("the config is \"{}\", not \"{}\"", kind_.empty() ? "(empty)" : kind_, wanted));
}

void validate(const PeftStackConfig& config, const std::string& path) {
  const std::string methods = field_path(path, "methods");
  if (config.methods.empty()) throw ConfigError(methods, "must hold at least one method");
  for (size_t i = 0; i < config.methods.size(); ++i) validate(config.methods[i], fmt::format("{}[{}]", methods, i));
}

void validate(const AnyPeftConfig& config, const std::string& path) {
  check_not_empty(config, path);
  const auto& method = method_for_kind(config.kind(), field_path(path, "kind"));
  if (method.validate) method.validate(config, path);
}

void to_json(json& j, const PeftStackConfig& c) { write_stack(j, c); }
void to_json(nlohmann::ordered_json& j, const PeftStackConfig& c) { write_stack(j, c); }
void from_json(const json& j, PeftStackConfig& c) {
  config_json::check_kind(j, "", PeftStackConfig::kind);
  c = parse_stack(j, "");
}
void to_json(json& j, const AnyPeftConfig& c) { write_any(j, c); }
void to_json(nlohmann::ordered_json& j, const AnyPeftConfig& c) { write_any(j, c); }
void from_json(const json& j, AnyPeftConfig& c) { c = parse_any(j, ""); }

AnyPeftConfig parse_peft_config(const std::string& json_text, const std::string& source) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number beyond double (1e400)
    throw ConfigError("", fmt::format("{}: not valid JSON: {}", source, e.what()));
  }
  return parse_any(j, "");
}

std::string dump_peft_config(const AnyPeftConfig& config) {
  nlohmann::ordered_json j;
  write_any(j, config);
  return j.dump();
}

// ------------------------------------------------------------ registrations

PeftMethodRegistration stack_registration() {
  return d9d_config_registration<PeftStackConfig, PeftStack>(&parse_stack);
}

}  // namespace d9d::peft
