// LoHa's configs: PEFT's LoHaConfig (adapter_config.json) and d9d's JSON
// (`{"kind":"loha","module_name_pattern":...,"params":{...}}`).
#include <d9d/peft/errors.h>
#include <d9d/peft/loha/config.h>

#include <fmt/format.h>

#include "../../json_text.h"
#include "../config_json.h"
#include "../hf/config_rules.h"

#include <cmath>
#include <set>

namespace d9d::peft {

void LoHaParameters::validate(const std::string& path) const {
  using config_json::field_path;
  if (r_ < 1) throw ConfigError(field_path(path, "r"), fmt::format("must be an integer >= 1, got {}", r_));
  if (!(alpha_ > 0) || !std::isfinite(alpha_)) {
    throw ConfigError(field_path(path, "alpha"), fmt::format("must be a finite number > 0, got {}", alpha_));
  }
  if (!(rank_dropout_ >= 0.0 && rank_dropout_ < 1.0)) {
    throw ConfigError(field_path(path, "rank_dropout"), fmt::format("must be in [0, 1), got {}", rank_dropout_));
  }
  if (!(module_dropout_ >= 0.0 && module_dropout_ < 1.0)) {
    throw ConfigError(field_path(path, "module_dropout"), fmt::format("must be in [0, 1), got {}", module_dropout_));
  }
}

namespace {

/// An integral alpha as PEFT writes it (8, not 8.0).
template <typename Json>
Json number_json(double v) {
  if (v == std::floor(v) && std::abs(v) <= 9007199254740992.0) return Json(static_cast<int64_t>(v));
  return Json(v);
}

}  // namespace

}  // namespace d9d::peft

namespace d9d::peft::hf {

using detail::check_pattern_key;
using detail::fail;
using detail::pattern_value;
using nlohmann::json;

namespace {

const std::set<std::string> kMetadata = {"auto_mapping", "revision", "inference_mode", "peft_version"};
/// Fields that must hold their default (null, or an empty list), as the LoRA reader requires.
const std::set<std::string> kDefaultOnly = {"layers_to_transform", "layers_pattern", "modules_to_save"};

}  // namespace

std::optional<LoHaParameters> LoHaConfig::select(const std::string& name) const {
  if (!target_modules.matches(name) || exclude_modules.matches(name)) return std::nullopt;
  return LoHaParameters()
      .r(pattern_value(rank_pattern, name).value_or(r))
      .alpha(pattern_value(alpha_pattern, name).value_or(alpha))
      .rank_dropout(rank_dropout)
      .module_dropout(module_dropout)
      .use_effective_conv2d(use_effective_conv2d)
      .init_weights(init_weights);
}

void validate(const LoHaConfig& c, const std::string& source) {
  if (c.target_modules.empty()) fail(source, "target_modules", "must name the modules to adapt");
  for (const auto* selector : {&c.target_modules, &c.exclude_modules}) {
    if (!selector->regex) continue;
    if (auto why = Pattern::syntax_error(*selector->regex); !why.empty()) {
      fail(source, selector == &c.target_modules ? "target_modules" : "exclude_modules", why);
    }
  }
  for (const auto& [key, value] : c.rank_pattern) {
    check_pattern_key(key, source, "rank_pattern." + key);
    if (value < 1) fail(source, "rank_pattern." + key, fmt::format("must be an integer >= 1, got {}", value));
  }
  for (const auto& [key, value] : c.alpha_pattern) {
    check_pattern_key(key, source, "alpha_pattern." + key);
    if (!(value > 0) || !std::isfinite(value)) {
      fail(source, "alpha_pattern." + key, fmt::format("must be a finite number > 0, got {}", value));
    }
  }
  if (c.r < 1) fail(source, "r", fmt::format("must be an integer >= 1, got {}", c.r));
  if (!(c.alpha > 0) || !std::isfinite(c.alpha)) {
    fail(source, "alpha", fmt::format("must be a finite number > 0, got {}", c.alpha));
  }
  if (!(c.rank_dropout >= 0 && c.rank_dropout < 1)) {
    fail(source, "rank_dropout", fmt::format("must be a number in [0, 1), got {}", c.rank_dropout));
  }
  if (!(c.module_dropout >= 0 && c.module_dropout < 1)) {
    fail(source, "module_dropout", fmt::format("must be a number in [0, 1), got {}", c.module_dropout));
  }
}

LoHaConfig parse_loha_config(const json& j, const std::string& source) {
  if (!j.is_object()) fail(source, "", "expected a JSON object");
  LoHaConfig c;
  for (const auto& item : j.items()) {
    const std::string& field = item.key();
    const json& v = item.value();
    auto number = [&](const char* rule) {
      if (!v.is_number()) fail(source, field, fmt::format("{}, got {}", rule, d9d::detail::quote_json(v)));
      return v.get<double>();
    };
    auto flag = [&] {
      if (!v.is_boolean()) fail(source, field, fmt::format("expected true or false, got {}", d9d::detail::quote_json(v)));
      return v.get<bool>();
    };
    if (field == "peft_type") {
      if (v != "LOHA") fail(source, field, fmt::format("{} is not \"LOHA\"", d9d::detail::quote_json(v)));
    } else if (field == "r") {
      if (!v.is_number_integer() || v.get<int64_t>() < 1) {
        fail(source, field, fmt::format("must be an integer >= 1, got {}", d9d::detail::quote_json(v)));
      }
      c.r = v.get<int64_t>();
    } else if (field == "alpha") {
      c.alpha = number("must be a finite number > 0");
    } else if (field == "rank_dropout") {
      c.rank_dropout = number("must be a number in [0, 1)");
    } else if (field == "module_dropout") {
      c.module_dropout = number("must be a number in [0, 1)");
    } else if (field == "use_effective_conv2d") {
      c.use_effective_conv2d = flag();
    } else if (field == "init_weights") {
      c.init_weights = flag();
    } else if (field == "target_modules") {
      c.target_modules = parse_selector(v, source, field);
    } else if (field == "exclude_modules") {
      c.exclude_modules = parse_selector(v, source, field);
    } else if (field == "rank_pattern" || field == "alpha_pattern") {
      if (v.is_null()) continue;
      if (!v.is_object()) fail(source, field, fmt::format("expected an object, got {}", d9d::detail::quote_json(v)));
      for (const auto& p : v.items()) {
        const std::string at = field + "." + p.key();
        if (field == "rank_pattern") {
          if (!p.value().is_number_integer()) {
            fail(source, at, fmt::format("must be an integer >= 1, got {}", d9d::detail::quote_json(p.value())));
          }
          c.rank_pattern.emplace_back(p.key(), p.value().get<int64_t>());
        } else {
          if (!p.value().is_number()) {
            fail(source, at, fmt::format("must be a number > 0, got {}", d9d::detail::quote_json(p.value())));
          }
          c.alpha_pattern.emplace_back(p.key(), p.value().get<double>());
        }
      }
    } else if (field == "base_model_name_or_path" || field == "task_type") {
      if (v.is_null()) continue;
      if (!v.is_string()) fail(source, field, fmt::format("expected a string or null, got {}", d9d::detail::quote_json(v)));
      (field == "task_type" ? c.task_type : c.base_model_name_or_path) = v.get<std::string>();
    } else if (kDefaultOnly.count(field)) {
      if (!(v.is_null() || (v.is_array() && v.empty()))) {
        fail(source, field, fmt::format("{} is not supported by d9d-peft (only null is); use an adapter without it",
                                        d9d::detail::quote_json(v)));
      }
    } else if (!kMetadata.count(field)) {
      fail(source, field, fmt::format("{} is not supported: d9d-peft does not know this LoHa field; use an adapter "
                                      "without it",
                                      d9d::detail::quote_json(v)));
    }
  }
  validate(c, source);
  return c;
}

std::string dump_loha_config(const LoHaConfig& c) {
  json j = {{"auto_mapping", nullptr},      {"inference_mode", true},  {"layers_pattern", nullptr},
            {"layers_to_transform", nullptr}, {"modules_to_save", nullptr}, {"peft_type", "LOHA"},
            {"peft_version", "0.21.0"},     {"revision", nullptr}};
  j["r"] = c.r;
  j["alpha"] = number_json<json>(c.alpha);
  j["rank_dropout"] = c.rank_dropout;
  j["module_dropout"] = c.module_dropout;
  j["use_effective_conv2d"] = c.use_effective_conv2d;
  j["init_weights"] = c.init_weights;
  j["target_modules"] = selector_json(c.target_modules);
  j["exclude_modules"] = selector_json(c.exclude_modules);
  j["rank_pattern"] = json::object();
  for (const auto& [k, v] : c.rank_pattern) j["rank_pattern"][k] = v;
  j["alpha_pattern"] = json::object();
  for (const auto& [k, v] : c.alpha_pattern) j["alpha_pattern"][k] = number_json<json>(v);
  j["base_model_name_or_path"] = c.base_model_name_or_path ? json(*c.base_model_name_or_path) : json(nullptr);
  j["task_type"] = c.task_type ? json(*c.task_type) : json(nullptr);
  return j.dump(2);
}

}  // namespace d9d::peft::hf

namespace d9d::peft {

using nlohmann::json;

namespace {

template <typename Json>
void write_config(Json& j, const LoHaConfig& c) {
  j = Json::object();
  j["kind"] = LoHaConfig::kind;
  j["module_name_pattern"] = c.module_name_pattern;
  Json params = Json::object();
  params["r"] = c.params.r();
  params["alpha"] = number_json<Json>(c.params.alpha());
  params["rank_dropout"] = c.params.rank_dropout();
  params["module_dropout"] = c.params.module_dropout();
  params["use_effective_conv2d"] = c.params.use_effective_conv2d();
  params["init_weights"] = c.params.init_weights();
  j["params"] = params;
}

}  // namespace

void validate(const LoHaConfig& c, const std::string& path) {
  using config_json::field_path;
  config_json::validate_pattern(c.module_name_pattern, field_path(path, "module_name_pattern"));
  c.params.validate(field_path(path, "params"));
}

hf::LoHaConfig to_peft_config(const LoHaConfig& c) {
  hf::LoHaConfig out;
  out.target_modules.regex = c.module_name_pattern;
  out.r = c.params.r();
  out.alpha = c.params.alpha();
  out.rank_dropout = c.params.rank_dropout();
  out.module_dropout = c.params.module_dropout();
  out.init_weights = c.params.init_weights();
  out.use_effective_conv2d = c.params.use_effective_conv2d();
  return out;
}

LoHaConfig parse_loha_config_json(const json& j, const std::string& path) {
  using namespace config_json;
  check_object(j, path, {"kind", "module_name_pattern", "params"});
  LoHaConfig c;
  c.module_name_pattern = get_string(require(j, path, "module_name_pattern"), field_path(path, "module_name_pattern"));
  const std::string params = field_path(path, "params");
  const json& p = require(j, path, "params");
  check_object(p, params, {"r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights"});
  c.params.r(get_int(require(p, params, "r"), field_path(params, "r")));
  c.params.alpha(get_number(require(p, params, "alpha"), field_path(params, "alpha")));
  if (p.contains("rank_dropout")) c.params.rank_dropout(get_number(p["rank_dropout"], field_path(params, "rank_dropout")));
  if (p.contains("module_dropout")) {
    c.params.module_dropout(get_number(p["module_dropout"], field_path(params, "module_dropout")));
  }
  if (p.contains("use_effective_conv2d")) {
    c.params.use_effective_conv2d(get_bool(p["use_effective_conv2d"], field_path(params, "use_effective_conv2d")));
  }
  if (p.contains("init_weights")) c.params.init_weights(get_bool(p["init_weights"], field_path(params, "init_weights")));
  validate(c, path);
  return c;
}

void to_json(json& j, const LoHaConfig& c) { write_config(j, c); }
void to_json(nlohmann::ordered_json& j, const LoHaConfig& c) { write_config(j, c); }
void from_json(const json& j, LoHaConfig& c) {
  config_json::check_kind(j, "", LoHaConfig::kind);
  c = parse_loha_config_json(j, "");
}

}  // namespace d9d::peft
