// JSON conversion and validation of the PEFT configurations. The JSON is the
// one the Python original's pydantic models read and write.
#include <d9d/peft/all/config.h>
#include <d9d/peft/errors.h>

#include <nlohmann/json.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../json_text.h"

#include <cmath>
#include <regex>

namespace d9d::peft {

namespace {

using nlohmann::json;

std::string field_path(const std::string& path, const std::string& field) {
  return path.empty() ? field : path + "." + field;
}

void check_object(const json& j, const std::string& path, const std::vector<std::string>& allowed) {
  if (!j.is_object()) throw ConfigError(path, fmt::format("expected an object, got {} {}", j.type_name(), d9d::detail::quote_json(j)));
  for (const auto& item : j.items()) {
    if (std::find(allowed.begin(), allowed.end(), item.key()) == allowed.end()) {
      throw ConfigError(field_path(path, item.key()),
                        fmt::format("unknown field; allowed fields are {}", fmt::join(allowed, ", ")));
    }
  }
}

const json& require(const json& j, const std::string& path, const std::string& field) {
  auto it = j.find(field);
  if (it == j.end()) throw ConfigError(field_path(path, field), "field required");
  return *it;
}

int64_t get_int(const json& v, const std::string& path) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && std::floor(d) == d) return static_cast<int64_t>(d);
  }
  throw ConfigError(path, fmt::format("expected an integer, got {}", d9d::detail::quote_json(v)));
}

double get_number(const json& v, const std::string& path) {
  if (v.is_number()) return v.get<double>();
  throw ConfigError(path, fmt::format("expected a number, got {}", d9d::detail::quote_json(v)));
}

std::string get_string(const json& v, const std::string& path) {
  if (v.is_string()) return v.get<std::string>();
  throw ConfigError(path, fmt::format("expected a string, got {}", d9d::detail::quote_json(v)));
}

void check_kind(const json& j, const std::string& path, const char* expected) {
  auto it = j.find("kind");
  if (it == j.end()) return;
  if (!it->is_string() || it->get<std::string>() != expected) {
    throw ConfigError(field_path(path, "kind"), fmt::format("expected \"{}\", got {}", expected, d9d::detail::quote_json(*it)));
  }
}

void validate_pattern(const std::string& pattern, const std::string& path) {
  if (pattern.empty()) throw ConfigError(path, "must not be empty (it must fully match qualified module names)");
  try {
    std::regex compiled(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw ConfigError(path, fmt::format("invalid regular expression \"{}\": {}", pattern, e.what()));
  }
}

LoRAParameters parse_lora_params(const json& j, const std::string& path) {
  check_object(j, path, {"r", "alpha", "dropout"});
  LoRAParameters p;
  p.r = get_int(require(j, path, "r"), field_path(path, "r"));
  p.alpha = get_int(require(j, path, "alpha"), field_path(path, "alpha"));
  p.dropout = get_number(require(j, path, "dropout"), field_path(path, "dropout"));
  return p;
}

LoRAConfig parse_lora(const json& j, const std::string& path) {
  check_object(j, path, {"kind", "module_name_pattern", "params"});
  check_kind(j, path, LoRAConfig::kind);
  LoRAConfig c;
  c.module_name_pattern =
      get_string(require(j, path, "module_name_pattern"), field_path(path, "module_name_pattern"));
  c.params = parse_lora_params(require(j, path, "params"), field_path(path, "params"));
  validate(c, path);
  return c;
}

FullTuneConfig parse_full_tune(const json& j, const std::string& path) {
  check_object(j, path, {"kind", "module_name_pattern"});
  check_kind(j, path, FullTuneConfig::kind);
  FullTuneConfig c;
  c.module_name_pattern =
      get_string(require(j, path, "module_name_pattern"), field_path(path, "module_name_pattern"));
  validate(c, path);
  return c;
}

AnyPeftConfig parse_any(const json& j, const std::string& path);

PeftStackConfig parse_stack(const json& j, const std::string& path) {
  check_object(j, path, {"kind", "methods"});
  check_kind(j, path, PeftStackConfig::kind);
  const json& methods = require(j, path, "methods");
  const std::string methods_path = field_path(path, "methods");
  if (!methods.is_array()) throw ConfigError(methods_path, fmt::format("expected a list, got {}", d9d::detail::quote_json(methods)));
  PeftStackConfig c;
  for (size_t i = 0; i < methods.size(); ++i) {
    c.methods.push_back(parse_any(methods[i], fmt::format("{}[{}]", methods_path, i)));
  }
  validate(c, path);
  return c;
}

AnyPeftConfig parse_any(const json& j, const std::string& path) {
  if (!j.is_object()) throw ConfigError(path, fmt::format("expected an object, got {} {}", j.type_name(), d9d::detail::quote_json(j)));
  auto it = j.find("kind");
  if (it == j.end()) {
    throw ConfigError(field_path(path, "kind"), "field required: one of \"lora\", \"full_tune\", \"stack\"");
  }
  const std::string kind = it->is_string() ? it->get<std::string>() : d9d::detail::quote_json(*it);
  if (kind == LoRAConfig::kind) return parse_lora(j, path);
  if (kind == FullTuneConfig::kind) return parse_full_tune(j, path);
  if (kind == PeftStackConfig::kind) return parse_stack(j, path);
  throw ConfigError(field_path(path, "kind"),
                    fmt::format("unknown kind \"{}\"; expected one of \"lora\", \"full_tune\", \"stack\"", kind));
}

template <typename Json>
void write(Json& j, const LoRAParameters& p) {
  j = Json::object();
  j["r"] = p.r;
  j["alpha"] = p.alpha;
  j["dropout"] = p.dropout;
}

template <typename Json>
void write(Json& j, const LoRAConfig& c) {
  j = Json::object();
  j["kind"] = LoRAConfig::kind;
  j["module_name_pattern"] = c.module_name_pattern;
  write(j["params"], c.params);
}

template <typename Json>
void write(Json& j, const FullTuneConfig& c) {
  j = Json::object();
  j["kind"] = FullTuneConfig::kind;
  j["module_name_pattern"] = c.module_name_pattern;
}

template <typename Json>
void write(Json& j, const AnyPeftConfig& c);

template <typename Json>
void write(Json& j, const PeftStackConfig& c) {
  j = Json::object();
  j["kind"] = PeftStackConfig::kind;
  j["methods"] = Json::array();
  for (const auto& method : c.methods) {
    Json item;
    write(item, method);
    j["methods"].push_back(std::move(item));
  }
}

template <typename Json>
void write(Json& j, const AnyPeftConfig& c) {
  std::visit([&j](const auto& config) { write(j, config); }, c.value);
}

}  // namespace

// ------------------------------------------------------------- validation

void validate(const LoRAConfig& config, const std::string& path) {
  validate_pattern(config.module_name_pattern, field_path(path, "module_name_pattern"));
  const std::string params = field_path(path, "params");
  if (config.params.r < 1) throw ConfigError(field_path(params, "r"), fmt::format("must be >= 1, got {}", config.params.r));
  if (config.params.alpha < 1) {
    throw ConfigError(field_path(params, "alpha"), fmt::format("must be >= 1, got {}", config.params.alpha));
  }
  if (!(config.params.dropout >= 0.0 && config.params.dropout < 1.0)) {
    throw ConfigError(field_path(params, "dropout"), fmt::format("must be in [0, 1), got {}", config.params.dropout));
  }
}

void validate(const FullTuneConfig& config, const std::string& path) {
  validate_pattern(config.module_name_pattern, field_path(path, "module_name_pattern"));
}

void validate(const PeftStackConfig& config, const std::string& path) {
  const std::string methods = field_path(path, "methods");
  if (config.methods.empty()) throw ConfigError(methods, "must hold at least one method");
  for (size_t i = 0; i < config.methods.size(); ++i) validate(config.methods[i], fmt::format("{}[{}]", methods, i));
}

void validate(const AnyPeftConfig& config, const std::string& path) {
  std::visit([&path](const auto& c) { validate(c, path); }, config.value);
}

std::string AnyPeftConfig::kind() const {
  return std::visit([](const auto& c) -> std::string { return std::decay_t<decltype(c)>::kind; }, value);
}

// ------------------------------------------------------------------- JSON

void to_json(nlohmann::json& j, const LoRAParameters& p) { write(j, p); }
void to_json(nlohmann::ordered_json& j, const LoRAParameters& p) { write(j, p); }
void from_json(const nlohmann::json& j, LoRAParameters& p) {
  p = parse_lora_params(j, "");
  validate(LoRAConfig{".*", p});
}
void to_json(nlohmann::json& j, const LoRAConfig& c) { write(j, c); }
void to_json(nlohmann::ordered_json& j, const LoRAConfig& c) { write(j, c); }
void from_json(const nlohmann::json& j, LoRAConfig& c) { c = parse_lora(j, ""); }
void to_json(nlohmann::json& j, const FullTuneConfig& c) { write(j, c); }
void to_json(nlohmann::ordered_json& j, const FullTuneConfig& c) { write(j, c); }
void from_json(const nlohmann::json& j, FullTuneConfig& c) { c = parse_full_tune(j, ""); }
void to_json(nlohmann::json& j, const PeftStackConfig& c) { write(j, c); }
void to_json(nlohmann::ordered_json& j, const PeftStackConfig& c) { write(j, c); }
void from_json(const nlohmann::json& j, PeftStackConfig& c) { c = parse_stack(j, ""); }
void to_json(nlohmann::json& j, const AnyPeftConfig& c) { write(j, c); }
void to_json(nlohmann::ordered_json& j, const AnyPeftConfig& c) { write(j, c); }
void from_json(const nlohmann::json& j, AnyPeftConfig& c) { c = parse_any(j, ""); }

AnyPeftConfig parse_peft_config(const std::string& json_text, const std::string& source) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::parse_error& e) {
    throw ConfigError("", fmt::format("{}: not valid JSON: {}", source, e.what()));
  }
  return parse_any(j, "");
}

std::string dump_peft_config(const AnyPeftConfig& config) {
  nlohmann::ordered_json j;
  write(j, config);
  return j.dump();
}

}  // namespace d9d::peft
