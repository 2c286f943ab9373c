// VeRA's configs: PEFT's VeraConfig (adapter_config.json) and d9d's JSON
// (`{"kind":"vera","module_name_pattern":...,"params":{...}}`).
#include <d9d/peft/errors.h>
#include <d9d/peft/vera/config.h>

#include <fmt/format.h>

#include "../../json_text.h"
#include "../config_json.h"
#include "../hf/config_rules.h"

#include <cmath>
#include <limits>
#include <set>

namespace d9d::peft {

void VeraParameters::validate(const std::string& path) const {
  using config_json::field_path;
  if (r_ < 1) throw ConfigError(field_path(path, "r"), fmt::format("must be an integer >= 1, got {}", r_));
  if (projection_prng_key_ < 0) {
    throw ConfigError(field_path(path, "projection_prng_key"),
                      fmt::format("must be an integer >= 0 (a generator seed), got {}", projection_prng_key_));
  }
  if (!(vera_dropout_ >= 0.0 && vera_dropout_ < 1.0)) {
    throw ConfigError(field_path(path, "vera_dropout"), fmt::format("must be in [0, 1), got {}", vera_dropout_));
  }
  if (!std::isfinite(d_initial_)) {
    throw ConfigError(field_path(path, "d_initial"), fmt::format("must be a finite number, got {}", d_initial_));
  }
}

}  // namespace d9d::peft

namespace d9d::peft::hf {

using detail::fail;
using nlohmann::json;

namespace {

const std::set<std::string> kMetadata = {"auto_mapping", "revision", "inference_mode", "peft_version"};
/// Fields that must hold their default (null, or an empty list), as the LoRA reader requires.
const std::set<std::string> kDefaultOnly = {"layers_to_transform", "layers_pattern", "modules_to_save"};

}  // namespace

std::optional<VeraParameters> VeraConfig::select(const std::string& name) const {
  if (!target_modules.matches(name)) return std::nullopt;
  return VeraParameters()
      .r(r)
      .projection_prng_key(projection_prng_key)
      .save_projection(save_projection)
      .vera_dropout(vera_dropout)
      .d_initial(d_initial)
      .init_weights(init_weights);
}

void validate(const VeraConfig& c, const std::string& source) {
  if (c.target_modules.empty()) fail(source, "target_modules", "must name the modules to adapt");
  if (c.target_modules.regex) {
    if (auto why = Pattern::syntax_error(*c.target_modules.regex); !why.empty()) fail(source, "target_modules", why);
  }
  if (c.r < 1) fail(source, "r", fmt::format("must be an integer >= 1, got {}", c.r));
  if (c.projection_prng_key < 0) {
    fail(source, "projection_prng_key", fmt::format("must be an integer >= 0 (a generator seed), got {}",
                                                    c.projection_prng_key));
  }
  if (!(c.vera_dropout >= 0 && c.vera_dropout < 1)) {
    fail(source, "vera_dropout", fmt::format("must be a number in [0, 1), got {}", c.vera_dropout));
  }
  if (!std::isfinite(c.d_initial)) fail(source, "d_initial", fmt::format("must be a finite number, got {}", c.d_initial));
}

VeraConfig parse_vera_config(const json& j, const std::string& source) {
  if (!j.is_object()) fail(source, "", "expected a JSON object");
  VeraConfig c;
  for (const auto& item : j.items()) {
    const std::string& field = item.key();
    const json& v = item.value();
    const std::string text = d9d::detail::quote_json(v);
    auto number = [&](const char* rule) {
      if (!v.is_number()) fail(source, field, fmt::format("{}, got {}", rule, text));
      return v.get<double>();
    };
    auto flag = [&] {
      if (!v.is_boolean()) fail(source, field, fmt::format("expected true or false, got {}", text));
      return v.get<bool>();
    };
    if (field == "peft_type") {
      if (v != "VERA") fail(source, field, fmt::format("{} is not \"VERA\"", text));
    } else if (field == "r") {
      if (!v.is_number_integer() || v.get<int64_t>() < 1) {
        fail(source, field, fmt::format("must be an integer >= 1, got {}", text));
      }
      c.r = v.get<int64_t>();
    } else if (field == "projection_prng_key") {
      const bool fits = v.is_number_unsigned() ? v.get<uint64_t>() <= uint64_t(std::numeric_limits<int64_t>::max())
                                               : v.is_number_integer() && v.get<int64_t>() >= 0;
      if (!fits) {
        fail(source, field, fmt::format("must be an integer in [0, 2^63) (a generator seed), got {}", text));
      }
      c.projection_prng_key = v.get<int64_t>();
    } else if (field == "save_projection") {
      c.save_projection = flag();
    } else if (field == "vera_dropout") {
      c.vera_dropout = number("must be a number in [0, 1)");
    } else if (field == "d_initial") {
      c.d_initial = number("must be a finite number");
    } else if (field == "init_weights") {
      c.init_weights = flag();
    } else if (field == "fan_in_fan_out") {
      if (v != false) {
        fail(source, field, fmt::format("{} is not supported: it is for GPT-2's Conv1D layers, and d9d-peft adapts "
                                        "linear layers [out, in] (PEFT sets it back to false for them too); use false",
                                        text));
      }
    } else if (field == "bias") {
      if (v != "none") {
        fail(source, field, fmt::format("{} is not supported by d9d-peft (only \"none\"): VeRA adapters here train "
                                        "no bias; use an adapter with bias \"none\"",
                                        text));
      }
    } else if (field == "target_modules") {
      c.target_modules = parse_selector(v, source, field);
    } else if (field == "base_model_name_or_path" || field == "task_type") {
      if (v.is_null()) continue;
      if (!v.is_string()) fail(source, field, fmt::format("expected a string or null, got {}", text));
      (field == "task_type" ? c.task_type : c.base_model_name_or_path) = v.get<std::string>();
    } else if (kDefaultOnly.count(field)) {
      if (!(v.is_null() || (v.is_array() && v.empty()))) {
        fail(source, field, fmt::format("{} is not supported by d9d-peft (only null is); use an adapter without it",
                                        text));
      }
    } else if (!kMetadata.count(field)) {
      fail(source, field, fmt::format("{} is not supported: d9d-peft does not know this VeRA field; use an adapter "
                                      "without it",
                                      text));
    }
  }
  validate(c, source);
  return c;
}

std::string dump_vera_config(const VeraConfig& c) {
  json j = {{"auto_mapping", nullptr},      {"bias", "none"},          {"fan_in_fan_out", false},
            {"inference_mode", true},       {"layers_pattern", nullptr}, {"layers_to_transform", nullptr},
            {"modules_to_save", nullptr},   {"peft_type", "VERA"},     {"peft_version", "0.21.0"},
            {"revision", nullptr}};
  j["r"] = c.r;
  j["projection_prng_key"] = c.projection_prng_key;
  j["save_projection"] = c.save_projection;
  j["vera_dropout"] = c.vera_dropout;
  j["d_initial"] = c.d_initial;
  j["init_weights"] = c.init_weights;
  j["target_modules"] = selector_json(c.target_modules);
  j["base_model_name_or_path"] = c.base_model_name_or_path ? json(*c.base_model_name_or_path) : json(nullptr);
  j["task_type"] = c.task_type ? json(*c.task_type) : json(nullptr);
  return j.dump(2);
}

}  // namespace d9d::peft::hf

namespace d9d::peft {

using nlohmann::json;

namespace {

template <typename Json>
void write_config(Json& j, const VeraConfig& c) {
  j = Json::object();
  j["kind"] = VeraConfig::kind;
  j["module_name_pattern"] = c.module_name_pattern;
  Json params = Json::object();
  params["r"] = c.params.r();
  params["projection_prng_key"] = c.params.projection_prng_key();
  params["save_projection"] = c.params.save_projection();
  params["vera_dropout"] = c.params.vera_dropout();
  params["d_initial"] = c.params.d_initial();
  params["init_weights"] = c.params.init_weights();
  j["params"] = params;
}

}  // namespace

void validate(const VeraConfig& c, const std::string& path) {
  using config_json::field_path;
  config_json::validate_pattern(c.module_name_pattern, field_path(path, "module_name_pattern"));
  c.params.validate(field_path(path, "params"));
}

hf::VeraConfig to_peft_config(const VeraConfig& c) {
  hf::VeraConfig out;
  out.target_modules.regex = c.module_name_pattern;
  out.r = c.params.r();
  out.projection_prng_key = c.params.projection_prng_key();
  out.save_projection = c.params.save_projection();
  out.vera_dropout = c.params.vera_dropout();
  out.d_initial = c.params.d_initial();
  out.init_weights = c.params.init_weights();
  return out;
}

VeraConfig parse_vera_config_json(const json& j, const std::string& path) {
  using namespace config_json;
  check_object(j, path, {"kind", "module_name_pattern", "params"});
  VeraConfig c;
  c.module_name_pattern = get_string(require(j, path, "module_name_pattern"), field_path(path, "module_name_pattern"));
  const std::string params = field_path(path, "params");
  const json& p = require(j, path, "params");
  check_object(p, params, {"r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "init_weights"});
  c.params.r(get_int(require(p, params, "r"), field_path(params, "r")));
  if (p.contains("projection_prng_key")) {
    c.params.projection_prng_key(get_int(p["projection_prng_key"], field_path(params, "projection_prng_key")));
  }
  if (p.contains("save_projection")) {
    c.params.save_projection(get_bool(p["save_projection"], field_path(params, "save_projection")));
  }
  if (p.contains("vera_dropout")) c.params.vera_dropout(get_number(p["vera_dropout"], field_path(params, "vera_dropout")));
  if (p.contains("d_initial")) c.params.d_initial(get_number(p["d_initial"], field_path(params, "d_initial")));
  if (p.contains("init_weights")) c.params.init_weights(get_bool(p["init_weights"], field_path(params, "init_weights")));
  validate(c, path);
  return c;
}

void to_json(json& j, const VeraConfig& c) { write_config(j, c); }
void to_json(nlohmann::ordered_json& j, const VeraConfig& c) { write_config(j, c); }
void from_json(const json& j, VeraConfig& c) {
  config_json::check_kind(j, "", VeraConfig::kind);
  c = parse_vera_config_json(j, "");
}

}  // namespace d9d::peft
