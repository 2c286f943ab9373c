// FullTune's d9d JSON config: `{"kind":"full_tune","module_name_pattern":...}`.
#include <d9d/peft/errors.h>
#include <d9d/peft/full_tune/config.h>

#include <fmt/format.h>

#include "../config_json.h"

namespace d9d::peft {

using nlohmann::json;

namespace {

template <typename Json>
void write_config(Json& j, const FullTuneConfig& c) {
  j = Json::object();
  j["kind"] = FullTuneConfig::kind;
  j["module_name_pattern"] = c.module_name_pattern;
}

}  // namespace

void validate(const FullTuneConfig& config, const std::string& path) {
  config_json::validate_pattern(config.module_name_pattern, config_json::field_path(path, "module_name_pattern"));
}

FullTuneConfig parse_full_tune_config_json(const json& j, const std::string& path) {
  using namespace config_json;
  check_object(j, path, {"kind", "module_name_pattern"});
  FullTuneConfig c;
  c.module_name_pattern = get_string(require(j, path, "module_name_pattern"), field_path(path, "module_name_pattern"));
  validate(c, path);
  return c;
}

void to_json(json& j, const FullTuneConfig& c) { write_config(j, c); }
void to_json(nlohmann::ordered_json& j, const FullTuneConfig& c) { write_config(j, c); }
void from_json(const json& j, FullTuneConfig& c) {
  config_json::check_kind(j, "", FullTuneConfig::kind);
  c = parse_full_tune_config_json(j, "");
}

}  // namespace d9d::peft
