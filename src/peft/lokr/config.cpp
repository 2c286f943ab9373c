// LoKr's configs: PEFT's LoKrConfig (adapter_config.json) and d9d's JSON
// (`{"kind":"lokr","module_name_pattern":...,"params":{...}}`).
#include <d9d/peft/errors.h>
#include <d9d/peft/lokr/config.h>

#include <fmt/format.h>

#include "../../json_text.h"
#include "../config_json.h"
#include "../hf/config_rules.h"

#include <cmath>
#include <set>

namespace d9d::peft {

void LoKrParameters::validate(const std::string& path) const {
  using config_json::field_path;
  if (r_ < 1) throw ConfigError(field_path(path, "r"), fmt::format("must be an integer >= 1, got {}", r_));
  if (!(alpha_ > 0) || !std::isfinite(alpha_)) {
    throw ConfigError(field_path(path, "alpha"), fmt::format("must be a finite number > 0, got {}", alpha_));
  }
  for (const auto& [name, p] : {std::make_pair("rank_dropout", rank_dropout_), std::make_pair("module_dropout", module_dropout_)}) {
    if (!(p >= 0.0 && p < 1.0)) throw ConfigError(field_path(path, name), fmt::format("must be in [0, 1), got {}", p));
  }
}

namespace {

/// alpha as PEFT writes it: 8 for an integral value, else the float.
template <typename Json>
Json alpha_json(double alpha) {
  const bool integral = alpha == std::floor(alpha) && std::abs(alpha) <= 9007199254740992.0;
  return integral ? Json(static_cast<int64_t>(alpha)) : Json(alpha);
}

/// init_weights as PEFT writes it: true, false or "lycoris".
template <typename Json>
Json init_json(LoKrInit init) {
  if (init == LoKrInit::kLycoris) return Json("lycoris");
  return Json(init == LoKrInit::kPeft);
}

/// init_weights from JSON; nothing for a value PEFT does not take.
std::optional<LoKrInit> init_of(const nlohmann::json& v) {
  if (v.is_boolean()) return v.get<bool>() ? LoKrInit::kPeft : LoKrInit::kRandom;
  if (v == "lycoris") return LoKrInit::kLycoris;
  return std::nullopt;
}

constexpr const char* kInitRule = "expected true, false or \"lycoris\"";

}  // namespace

}  // namespace d9d::peft

namespace d9d::peft::hf {

using d9d::detail::quote_json;
using detail::check_pattern_key;
using detail::fail;
using detail::pattern_value;
using nlohmann::json;

namespace {

const std::set<std::string> kMetadata = {"auto_mapping", "revision", "inference_mode", "peft_version"};
/// Fields that must hold their default (null, or an empty list), as the LoRA reader requires.
const std::set<std::string> kDefaultOnly = {"layers_to_transform", "layers_pattern", "modules_to_save"};

}  // namespace

std::optional<LoKrParameters> LoKrConfig::select(const std::string& name) const {
  if (!target_modules.matches(name) || exclude_modules.matches(name)) return std::nullopt;
  return LoKrParameters()
      .r(pattern_value(rank_pattern, name).value_or(r))
      .alpha(pattern_value(alpha_pattern, name).value_or(alpha))
      .rank_dropout(rank_dropout)
      .rank_dropout_scale(rank_dropout_scale)
      .module_dropout(module_dropout)
      .decompose_both(decompose_both)
      .decompose_factor(decompose_factor)
      .use_effective_conv2d(use_effective_conv2d)
      .init_weights(init_weights);
}

void validate(const LoKrConfig& c, const std::string& source) {
  if (c.target_modules.empty()) fail(source, "target_modules", "must name the modules to adapt");
  if (c.target_modules.regex) {
    if (auto why = Pattern::syntax_error(*c.target_modules.regex); !why.empty()) fail(source, "target_modules", why);
  }
  if (c.exclude_modules.regex) {
    if (auto why = Pattern::syntax_error(*c.exclude_modules.regex); !why.empty()) fail(source, "exclude_modules", why);
  }
  for (const auto& [key, rank] : c.rank_pattern) {
    check_pattern_key(key, source, "rank_pattern." + key);
    if (rank < 1) fail(source, "rank_pattern." + key, fmt::format("must be an integer >= 1, got {}", rank));
  }
  for (const auto& [key, a] : c.alpha_pattern) {
    check_pattern_key(key, source, "alpha_pattern." + key);
    if (!(a > 0) || !std::isfinite(a)) fail(source, "alpha_pattern." + key, fmt::format("must be a finite number > 0, got {}", a));
  }
  if (c.r < 1) fail(source, "r", fmt::format("must be an integer >= 1, got {}", c.r));
  if (!(c.alpha > 0) || !std::isfinite(c.alpha)) fail(source, "alpha", fmt::format("must be a finite number > 0, got {}", c.alpha));
  if (!(c.rank_dropout >= 0 && c.rank_dropout < 1)) {
    fail(source, "rank_dropout", fmt::format("must be a number in [0, 1), got {}", c.rank_dropout));
  }
  if (!(c.module_dropout >= 0 && c.module_dropout < 1)) {
    fail(source, "module_dropout", fmt::format("must be a number in [0, 1), got {}", c.module_dropout));
  }
}

LoKrConfig parse_lokr_config(const json& j, const std::string& source) {
  if (!j.is_object()) fail(source, "", "expected a JSON object");
  LoKrConfig c;
  for (const auto& item : j.items()) {
    const std::string& field = item.key();
    const json& v = item.value();
    auto number = [&](const char* rule) {
      if (!v.is_number()) fail(source, field, fmt::format("{}, got {}", rule, quote_json(v)));
      return v.get<double>();
    };
    auto integer = [&](const char* rule) {
      if (!v.is_number_integer()) fail(source, field, fmt::format("{}, got {}", rule, quote_json(v)));
      return v.get<int64_t>();
    };
    auto flag = [&] {
      if (!v.is_boolean()) fail(source, field, fmt::format("expected true or false, got {}", quote_json(v)));
      return v.get<bool>();
    };
    if (field == "peft_type") {
      if (v != "LOKR") fail(source, field, fmt::format("{} is not \"LOKR\"", quote_json(v)));
    } else if (field == "r") {
      c.r = integer("must be an integer >= 1");
      if (c.r < 1) fail(source, field, fmt::format("must be an integer >= 1, got {}", c.r));
    } else if (field == "alpha") {
      c.alpha = number("must be a finite number > 0");
    } else if (field == "rank_dropout") {
      c.rank_dropout = number("must be a number in [0, 1)");
    } else if (field == "module_dropout") {
      c.module_dropout = number("must be a number in [0, 1)");
    } else if (field == "rank_dropout_scale") {
      c.rank_dropout_scale = flag();
    } else if (field == "use_effective_conv2d") {
      c.use_effective_conv2d = flag();
    } else if (field == "decompose_both") {
      c.decompose_both = flag();
    } else if (field == "decompose_factor") {
      c.decompose_factor = integer("must be an integer (-1: split near the square root)");
    } else if (field == "init_weights") {
      const auto init = init_of(v);
      if (!init) fail(source, field, fmt::format("{}, got {}", kInitRule, quote_json(v)));
      c.init_weights = *init;
    } else if (field == "target_modules" || field == "exclude_modules") {
      (field == "target_modules" ? c.target_modules : c.exclude_modules) = parse_selector(v, source, field);
    } else if (field == "rank_pattern" || field == "alpha_pattern") {
      if (v.is_null()) continue;
      if (!v.is_object()) fail(source, field, fmt::format("expected an object, got {}", quote_json(v)));
      for (const auto& p : v.items()) {
        const std::string at = field + "." + p.key();
        const bool rank = field == "rank_pattern";
        if (rank ? !p.value().is_number_integer() : !p.value().is_number()) {
          fail(source, at, fmt::format("must be {}, got {}", rank ? "an integer >= 1" : "a number > 0",
                                       quote_json(p.value())));
        }
        if (rank) {
          c.rank_pattern.emplace_back(p.key(), p.value().get<int64_t>());
        } else {
          c.alpha_pattern.emplace_back(p.key(), p.value().get<double>());
        }
      }
    } else if (field == "base_model_name_or_path" || field == "task_type") {
      if (v.is_null()) continue;
      if (!v.is_string()) fail(source, field, fmt::format("expected a string or null, got {}", quote_json(v)));
      (field == "task_type" ? c.task_type : c.base_model_name_or_path) = v.get<std::string>();
    } else if (kDefaultOnly.count(field)) {
      if (!(v.is_null() || (v.is_array() && v.empty()))) {
        fail(source, field, fmt::format("{} is not supported by d9d-peft (only null is); use an adapter without it",
                                        quote_json(v)));
      }
    } else if (!kMetadata.count(field)) {
      fail(source, field, fmt::format("{} is not supported: d9d-peft does not know this LoKr field; use an adapter "
                                      "without it",
                                      quote_json(v)));
    }
  }
  validate(c, source);
  return c;
}

std::string dump_lokr_config(const LoKrConfig& c) {
  json j = {{"auto_mapping", nullptr},        {"inference_mode", true},     {"layers_pattern", nullptr},
            {"layers_to_transform", nullptr}, {"modules_to_save", nullptr}, {"peft_type", "LOKR"},
            {"peft_version", "0.21.0"},       {"revision", nullptr}};
  j["r"] = c.r;
  j["alpha"] = alpha_json<json>(c.alpha);
  j["rank_dropout"] = c.rank_dropout;
  j["module_dropout"] = c.module_dropout;
  j["rank_dropout_scale"] = c.rank_dropout_scale;
  j["use_effective_conv2d"] = c.use_effective_conv2d;
  j["decompose_both"] = c.decompose_both;
  j["decompose_factor"] = c.decompose_factor;
  j["init_weights"] = init_json<json>(c.init_weights);
  j["target_modules"] = selector_json(c.target_modules);
  j["exclude_modules"] = selector_json(c.exclude_modules);
  j["rank_pattern"] = json::object();
  for (const auto& [k, v] : c.rank_pattern) j["rank_pattern"][k] = v;
  j["alpha_pattern"] = json::object();
  for (const auto& [k, v] : c.alpha_pattern) j["alpha_pattern"][k] = alpha_json<json>(v);
  j["base_model_name_or_path"] = c.base_model_name_or_path ? json(*c.base_model_name_or_path) : json(nullptr);
  j["task_type"] = c.task_type ? json(*c.task_type) : json(nullptr);
  return j.dump(2);
}

}  // namespace d9d::peft::hf

namespace d9d::peft {

using nlohmann::json;

namespace {

template <typename Json>
void write_config(Json& j, const LoKrConfig& c) {
  const LoKrParameters& p = c.params;
  Json params = Json::object();
  params["r"] = p.r();
  params["alpha"] = alpha_json<Json>(p.alpha());
  params["rank_dropout"] = p.rank_dropout();
  params["module_dropout"] = p.module_dropout();
  params["rank_dropout_scale"] = p.rank_dropout_scale();
  params["decompose_both"] = p.decompose_both();
  params["decompose_factor"] = p.decompose_factor();
  params["use_effective_conv2d"] = p.use_effective_conv2d();
  params["init_weights"] = init_json<Json>(p.init_weights());
  j = Json::object();
  j["kind"] = LoKrConfig::kind;
  j["module_name_pattern"] = c.module_name_pattern;
  j["params"] = params;
}

}  // namespace

void validate(const LoKrConfig& c, const std::string& path) {
  using config_json::field_path;
  config_json::validate_pattern(c.module_name_pattern, field_path(path, "module_name_pattern"));
  c.params.validate(field_path(path, "params"));
}

hf::LoKrConfig to_peft_config(const LoKrConfig& c) {
  const LoKrParameters& p = c.params;
  hf::LoKrConfig out;
  out.target_modules.regex = c.module_name_pattern;
  out.r = p.r();
  out.alpha = p.alpha();
  out.rank_dropout = p.rank_dropout();
  out.module_dropout = p.module_dropout();
  out.rank_dropout_scale = p.rank_dropout_scale();
  out.decompose_both = p.decompose_both();
  out.decompose_factor = p.decompose_factor();
  out.use_effective_conv2d = p.use_effective_conv2d();
  out.init_weights = p.init_weights();
  return out;
}

LoKrConfig parse_lokr_config_json(const json& j, const std::string& path) {
  using namespace config_json;
  check_object(j, path, {"kind", "module_name_pattern", "params"});
  LoKrConfig c;
  c.module_name_pattern = get_string(require(j, path, "module_name_pattern"), field_path(path, "module_name_pattern"));
  const std::string at = field_path(path, "params");
  const json& p = require(j, path, "params");
  check_object(p, at, {"r", "alpha", "rank_dropout", "module_dropout", "rank_dropout_scale", "decompose_both",
                       "decompose_factor", "use_effective_conv2d", "init_weights"});
  LoKrParameters& o = c.params;
  o.r(get_int(require(p, at, "r"), field_path(at, "r")));
  o.alpha(get_number(require(p, at, "alpha"), field_path(at, "alpha")));
  if (p.contains("rank_dropout")) o.rank_dropout(get_number(p["rank_dropout"], field_path(at, "rank_dropout")));
  if (p.contains("module_dropout")) o.module_dropout(get_number(p["module_dropout"], field_path(at, "module_dropout")));
  if (p.contains("rank_dropout_scale")) {
    o.rank_dropout_scale(get_bool(p["rank_dropout_scale"], field_path(at, "rank_dropout_scale")));
  }
  if (p.contains("decompose_both")) o.decompose_both(get_bool(p["decompose_both"], field_path(at, "decompose_both")));
  if (p.contains("decompose_factor")) {
    o.decompose_factor(get_int(p["decompose_factor"], field_path(at, "decompose_factor")));
  }
  if (p.contains("use_effective_conv2d")) {
    o.use_effective_conv2d(get_bool(p["use_effective_conv2d"], field_path(at, "use_effective_conv2d")));
  }
  if (p.contains("init_weights")) {
    const auto init = init_of(p["init_weights"]);
    if (!init) {
      throw ConfigError(field_path(at, "init_weights"),
                        fmt::format("{}, got {}", kInitRule, d9d::detail::quote_json(p["init_weights"])));
    }
    o.init_weights(*init);
  }
  validate(c, path);
  return c;
}

void to_json(json& j, const LoKrConfig& c) { write_config(j, c); }
void to_json(nlohmann::ordered_json& j, const LoKrConfig& c) { write_config(j, c); }
void from_json(const json& j, LoKrConfig& c) {
  config_json::check_kind(j, "", LoKrConfig::kind);
  c = parse_lokr_config_json(j, "");
}

}  // namespace d9d::peft
