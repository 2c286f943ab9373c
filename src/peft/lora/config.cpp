// LoRA's parameters and its d9d JSON config (the Python original's pydantic
// model: `{"kind":"lora","module_name_pattern":...,"params":{"r","alpha","dropout"}}`).
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/config.h>

#include <fmt/format.h>

#include "../config_json.h"

#include <cmath>

namespace d9d::peft {

using nlohmann::json;
using config_json::field_path;

double LoRAParameters::scale() const {
  return use_rslora_ ? alpha_ / std::sqrt(static_cast<double>(r_)) : alpha_ / static_cast<double>(r_);
}

void LoRAParameters::validate(const std::string& path) const {
  if (r_ < 1) throw ConfigError(field_path(path, "r"), fmt::format("must be >= 1, got {}", r_));
  if (!(alpha_ > 0) || !std::isfinite(alpha_)) {
    throw ConfigError(field_path(path, "alpha"), fmt::format("must be a finite number > 0, got {}", alpha_));
  }
  if (!(dropout_ >= 0.0 && dropout_ < 1.0)) {
    throw ConfigError(field_path(path, "dropout"), fmt::format("must be in [0, 1), got {}", dropout_));
  }
}

namespace {

LoRAParameters parse_params(const json& j, const std::string& path) {
  using namespace config_json;
  check_object(j, path, {"r", "alpha", "dropout", "use_rslora", "use_dora"});
  LoRAParameters p;
  p.r(get_int(require(j, path, "r"), field_path(path, "r")));
  p.alpha(static_cast<double>(get_int(require(j, path, "alpha"), field_path(path, "alpha"))));
  p.dropout(get_number(require(j, path, "dropout"), field_path(path, "dropout")));
  if (j.contains("use_rslora")) p.use_rslora(get_bool(j["use_rslora"], field_path(path, "use_rslora")));
  if (j.contains("use_dora")) p.use_dora(get_bool(j["use_dora"], field_path(path, "use_dora")));
  return p;
}

template <typename Json>
void write_params(Json& j, const LoRAParameters& p) {
  j = Json::object();
  j["r"] = p.r();
  j["alpha"] = static_cast<int64_t>(p.alpha());
  j["dropout"] = p.dropout();
  // Not in the Python original: written only when set, so its output stays byte-identical.
  if (p.use_rslora()) j["use_rslora"] = true;
  if (p.use_dora()) j["use_dora"] = true;
}

template <typename Json>
void write_config(Json& j, const LoRAConfig& c) {
  j = Json::object();
  j["kind"] = LoRAConfig::kind;
  j["module_name_pattern"] = c.module_name_pattern;
  write_params(j["params"], c.params);
}

}  // namespace

void validate(const LoRAConfig& config, const std::string& path) {
  config_json::validate_pattern(config.module_name_pattern, field_path(path, "module_name_pattern"));
  const std::string params = field_path(path, "params");
  if (config.params.r() < 1) config.params.validate(params);  // names r first, as the fields are ordered
  const double alpha = config.params.alpha();
  if (!(alpha >= 1)) throw ConfigError(field_path(params, "alpha"), fmt::format("must be >= 1, got {}", alpha));
  if (std::floor(alpha) != alpha) {
    throw ConfigError(field_path(params, "alpha"),
                      fmt::format("must be an integer in a d9d config, got {} (hf::LoraConfig takes any alpha > 0)",
                                  alpha));
  }
  config.params.validate(params);
}

LoRAConfig parse_lora_config_json(const json& j, const std::string& path) {
  using namespace config_json;
  check_object(j, path, {"kind", "module_name_pattern", "params"});
  LoRAConfig c;
  c.module_name_pattern = get_string(require(j, path, "module_name_pattern"), field_path(path, "module_name_pattern"));
  c.params = parse_params(require(j, path, "params"), field_path(path, "params"));
  validate(c, path);
  return c;
}

void to_json(json& j, const LoRAParameters& p) { write_params(j, p); }
void to_json(nlohmann::ordered_json& j, const LoRAParameters& p) { write_params(j, p); }
void from_json(const json& j, LoRAParameters& p) {
  p = parse_params(j, "");
  validate(LoRAConfig{".*", p});
}
void to_json(json& j, const LoRAConfig& c) { write_config(j, c); }
void to_json(nlohmann::ordered_json& j, const LoRAConfig& c) { write_config(j, c); }
void from_json(const json& j, LoRAConfig& c) {
  config_json::check_kind(j, "", LoRAConfig::kind);
  c = parse_lora_config_json(j, "");
}

}  // namespace d9d::peft
