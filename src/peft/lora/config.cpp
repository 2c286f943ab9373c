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
  if (pissa_niter_ < 0 || (pissa_niter_ > 0 && init_ != LoRAInit::PiSSA)) {
    throw ConfigError(field_path(path, "pissa_niter"),
                      fmt::format("must be 0, or >= 1 with the PiSSA initialisation; got {}", pissa_niter_));
  }
}

std::string lora_init_name(const LoRAParameters& p) {
  switch (p.init()) {
    case LoRAInit::Default: return "default";
    case LoRAInit::Gaussian: return "gaussian";
    case LoRAInit::Random: return "random";
    case LoRAInit::PiSSA: return p.pissa_niter() > 0 ? fmt::format("pissa_niter_{}", p.pissa_niter()) : "pissa";
    case LoRAInit::OLoRA: return "olora";
  }
  return "default";
}

bool parse_lora_init_name(const std::string& name, LoRAParameters& p) {
  p.pissa_niter(0);
  if (name == "default") p.init(LoRAInit::Default);
  else if (name == "gaussian") p.init(LoRAInit::Gaussian);
  else if (name == "random") p.init(LoRAInit::Random);
  else if (name == "pissa") p.init(LoRAInit::PiSSA);
  else if (name == "olora") p.init(LoRAInit::OLoRA);
  else if (name.rfind("pissa_niter_", 0) == 0) {
    const std::string digits = name.substr(12);
    if (digits.empty() || digits.size() > 6 || digits.find_first_not_of("0123456789") != std::string::npos) return false;
    const int64_t n = std::stoll(digits);
    if (n < 1) return false;
    p.init(LoRAInit::PiSSA).pissa_niter(n);
  } else {
    return false;
  }
  return true;
}

namespace {

LoRAParameters parse_params(const json& j, const std::string& path) {
  using namespace config_json;
  check_object(j, path, {"r", "alpha", "dropout", "use_rslora", "use_dora", "init"});
  LoRAParameters p;
  p.r(get_int(require(j, path, "r"), field_path(path, "r")));
  p.alpha(static_cast<double>(get_int(require(j, path, "alpha"), field_path(path, "alpha"))));
  p.dropout(get_number(require(j, path, "dropout"), field_path(path, "dropout")));
  if (j.contains("use_rslora")) p.use_rslora(get_bool(j["use_rslora"], field_path(path, "use_rslora")));
  if (j.contains("use_dora")) p.use_dora(get_bool(j["use_dora"], field_path(path, "use_dora")));
  if (j.contains("init")) {
    const std::string name = get_string(j["init"], field_path(path, "init"));
    if (!parse_lora_init_name(name, p)) {
      throw ConfigError(field_path(path, "init"),
                        fmt::format("\"{}\" is not an initialisation; use \"default\", \"gaussian\", \"pissa\", "
                                    "\"pissa_niter_<n>\" (n >= 1) or \"olora\"",
                                    name));
    }
  }
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
  if (p.init() != LoRAInit::Default) j["init"] = lora_init_name(p);
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
