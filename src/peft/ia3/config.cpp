// PEFT's IA3Config (adapter_config.json): parsing, checking, writing.
#include <d9d/peft/errors.h>
#include <d9d/peft/ia3/config.h>

#include <fmt/format.h>

#include "../../json_text.h"

#include <algorithm>
#include <d9d/peft/pattern.h>
#include <set>
#include "../config_json.h"
#include "../hf/config_rules.h"

namespace d9d::peft::hf {

using detail::ends_with;
using detail::fail;

using nlohmann::json;

namespace {

/// Bookkeeping fields that do not change the numbers.
const std::set<std::string> kMetadata = {"auto_mapping", "revision", "inference_mode", "peft_version"};

}  // namespace

std::optional<IA3Parameters> IA3Config::select(const std::string& name) const {
  if (!target_modules.matches(name) || exclude_modules.matches(name)) return std::nullopt;
  bool feedforward = false;
  if (feedforward_modules.regex) {
    feedforward = Pattern(*feedforward_modules.regex, "feedforward_modules").full_match(name);
  } else {
    feedforward = std::any_of(feedforward_modules.names.begin(), feedforward_modules.names.end(),
                              [&](const std::string& key) { return ends_with(name, key); });
  }
  return IA3Parameters().feedforward(feedforward).init_ones(init_ia3_weights);
}

void validate(const IA3Config& c, const std::string& source) {
  if (c.target_modules.empty()) fail(source, "target_modules", "must name the modules to adapt");
  for (const auto& [field, selector] :
       {std::pair<const char*, const ModuleSelector*>{"target_modules", &c.target_modules},
        {"exclude_modules", &c.exclude_modules},
        {"feedforward_modules", &c.feedforward_modules}}) {
    if (!selector->regex) continue;
    if (auto why = Pattern::syntax_error(*selector->regex); !why.empty()) fail(source, field, why);
  }
  // PEFT: a list of feed-forward modules must be a subset of a list of targets.
  if (!c.target_modules.regex && !c.feedforward_modules.regex) {
    for (const auto& name : c.feedforward_modules.names) {
      if (std::find(c.target_modules.names.begin(), c.target_modules.names.end(), name) ==
          c.target_modules.names.end()) {
        fail(source, "feedforward_modules",
             fmt::format("\"{}\" is not in target_modules; feedforward_modules must be a subset of target_modules",
                         name));
      }
    }
  }
}

IA3Config parse_ia3_config(const json& j, const std::string& source) {
  if (!j.is_object()) fail(source, "", "expected a JSON object");
  IA3Config c;
  for (const auto& item : j.items()) {
    const std::string& field = item.key();
    const json& v = item.value();
    if (field == "peft_type") {
      if (v != "IA3") fail(source, field, fmt::format("{} is not \"IA3\"", d9d::detail::quote_json(v)));
    } else if (field == "target_modules") {
      c.target_modules = parse_selector(v, source, field);
    } else if (field == "exclude_modules") {
      c.exclude_modules = parse_selector(v, source, field);
    } else if (field == "feedforward_modules") {
      c.feedforward_modules = parse_selector(v, source, field);
    } else if (field == "init_ia3_weights") {
      if (!v.is_boolean()) fail(source, field, fmt::format("expected true or false, got {}", d9d::detail::quote_json(v)));
      c.init_ia3_weights = v.get<bool>();
    } else if (field == "base_model_name_or_path" || field == "task_type") {
      if (v.is_null()) continue;
      if (!v.is_string()) fail(source, field, fmt::format("expected a string or null, got {}", d9d::detail::quote_json(v)));
      (field == "task_type" ? c.task_type : c.base_model_name_or_path) = v.get<std::string>();
    } else if (field == "fan_in_fan_out" || field == "modules_to_save") {
      if (!(v.is_null() || v == false || (v.is_array() && v.empty()))) {
        fail(source, field, fmt::format("{} is not supported by d9d-peft (only the default is); use an adapter without "
                                        "it",
                                        d9d::detail::quote_json(v)));
      }
    } else if (!kMetadata.count(field)) {
      fail(source, field, fmt::format("{} is not supported: d9d-peft does not know this IA3 field; use an adapter "
                                      "without it",
                                      d9d::detail::quote_json(v)));
    }
  }
  validate(c, source);
  return c;
}

std::string dump_ia3_config(const IA3Config& c) {
  json j = {{"auto_mapping", nullptr}, {"fan_in_fan_out", false}, {"inference_mode", true},
            {"modules_to_save", nullptr}, {"peft_type", "IA3"}, {"peft_version", "0.21.0"}, {"revision", nullptr}};
  j["target_modules"] = selector_json(c.target_modules);
  j["exclude_modules"] = selector_json(c.exclude_modules);
  j["feedforward_modules"] = c.feedforward_modules.empty() ? json::array() : selector_json(c.feedforward_modules);
  j["init_ia3_weights"] = c.init_ia3_weights;
  j["base_model_name_or_path"] = c.base_model_name_or_path ? json(*c.base_model_name_or_path) : json(nullptr);
  j["task_type"] = c.task_type ? json(*c.task_type) : json(nullptr);
  return j.dump(2);
}

}  // namespace d9d::peft::hf

namespace d9d::peft {

using nlohmann::json;

namespace {

template <typename Json>
void write_config(Json& j, const IA3Config& c) {
  j = Json::object();
  j["kind"] = IA3Config::kind;
  j["module_name_pattern"] = c.module_name_pattern;
  j["params"] = Json::object();
  if (!c.feedforward_pattern.empty()) j["params"]["feedforward_pattern"] = c.feedforward_pattern;
}

}  // namespace

void validate(const IA3Config& c, const std::string& path) {
  using config_json::field_path;
  config_json::validate_pattern(c.module_name_pattern, field_path(path, "module_name_pattern"));
  if (!c.feedforward_pattern.empty()) {
    config_json::validate_pattern(c.feedforward_pattern, field_path(field_path(path, "params"), "feedforward_pattern"));
  }
}

hf::IA3Config to_peft_config(const IA3Config& c) {
  hf::IA3Config out;
  out.target_modules.regex = c.module_name_pattern;
  if (!c.feedforward_pattern.empty()) out.feedforward_modules.regex = c.feedforward_pattern;
  return out;
}

IA3Config parse_ia3_config_json(const json& j, const std::string& path) {
  using namespace config_json;
  check_object(j, path, {"kind", "module_name_pattern", "params"});
  IA3Config c;
  c.module_name_pattern = get_string(require(j, path, "module_name_pattern"), field_path(path, "module_name_pattern"));
  if (auto it = j.find("params"); it != j.end()) {
    const std::string params = field_path(path, "params");
    check_object(*it, params, {"feedforward_pattern"});
    if (auto ff = it->find("feedforward_pattern"); ff != it->end() && !ff->is_null()) {
      c.feedforward_pattern = get_string(*ff, field_path(params, "feedforward_pattern"));
    }
  }
  validate(c, path);
  return c;
}

void to_json(json& j, const IA3Config& c) { write_config(j, c); }
void to_json(nlohmann::ordered_json& j, const IA3Config& c) { write_config(j, c); }
void from_json(const json& j, IA3Config& c) {
  config_json::check_kind(j, "", IA3Config::kind);
  c = parse_ia3_config_json(j, "");
}

}  // namespace d9d::peft
