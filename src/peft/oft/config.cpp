// OFT's configs: PEFT's OFTConfig (adapter_config.json) and d9d's JSON
// (`{"kind":"oft","module_name_pattern":...,"params":{...}}`).
#include <d9d/peft/errors.h>
#include <d9d/peft/oft/config.h>

#include <fmt/format.h>

#include "../../json_text.h"
#include "../config_json.h"
#include "../hf/config_rules.h"

#include <cmath>
#include <functional>
#include <set>

namespace d9d::peft {

namespace {

/// The rules both configs share; `bad(field, rule)` throws.
void check_parameters(const OFTParameters& o, const std::function<void(const char*, std::string)>& bad) {
  if (o.r() < 0) bad("r", fmt::format("must be an integer >= 0, got {}", o.r()));
  if (o.oft_block_size() < 0) bad("oft_block_size", fmt::format("must be an integer >= 0, got {}", o.oft_block_size()));
  if ((o.r() == 0) == (o.oft_block_size() == 0)) {
    bad(o.r() == 0 ? "r" : "oft_block_size",
        fmt::format("exactly one of r and oft_block_size must be non-zero (the other follows from in_features), got "
                    "r = {} and oft_block_size = {}",
                    o.r(), o.oft_block_size()));
  }
  if (!(o.eps() >= 0) || !std::isfinite(o.eps())) bad("eps", fmt::format("must be a finite number >= 0, got {}", o.eps()));
  if (o.num_cayley_neumann_terms() < 1) {
    bad("num_cayley_neumann_terms", fmt::format("must be an integer >= 1, got {}", o.num_cayley_neumann_terms()));
  }
  if (!(o.module_dropout() >= 0.0 && o.module_dropout() < 1.0)) {
    bad("module_dropout", fmt::format("must be a number in [0, 1), got {}", o.module_dropout()));
  }
}

}  // namespace

void OFTParameters::validate(const std::string& path) const {
  check_parameters(*this, [&](const char* field, std::string rule) {
    throw ConfigError(config_json::field_path(path, field), rule);
  });
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

OFTParameters OFTConfig::parameters() const {
  return OFTParameters()
      .r(r)
      .oft_block_size(oft_block_size)
      .module_dropout(module_dropout)
      .coft(coft)
      .eps(eps)
      .block_share(block_share)
      .use_cayley_neumann(use_cayley_neumann)
      .num_cayley_neumann_terms(num_cayley_neumann_terms)
      .init_weights(init_weights);
}

std::optional<OFTParameters> OFTConfig::select(const std::string& name) const {
  if (!target_modules.matches(name) || exclude_modules.matches(name)) return std::nullopt;
  return parameters();
}

void validate(const OFTConfig& c, const std::string& source) {
  if (c.target_modules.empty()) fail(source, "target_modules", "must name the modules to adapt");
  for (const auto* selector : {&c.target_modules, &c.exclude_modules}) {
    if (!selector->regex) continue;
    if (auto why = Pattern::syntax_error(*selector->regex); !why.empty()) {
      fail(source, selector == &c.target_modules ? "target_modules" : "exclude_modules", why);
    }
  }
  check_parameters(c.parameters(), [&](const char* field, std::string rule) { fail(source, field, rule); });
}

OFTConfig parse_oft_config(const json& j, const std::string& source) {
  if (!j.is_object()) fail(source, "", "expected a JSON object");
  OFTConfig c;
  for (const auto& item : j.items()) {
    const std::string& field = item.key();
    const json& v = item.value();
    auto number = [&](const char* rule) {
      if (!v.is_number()) fail(source, field, fmt::format("{}, got {}", rule, d9d::detail::quote_json(v)));
      return v.get<double>();
    };
    auto integer = [&](const char* rule) {
      if (!v.is_number_integer()) fail(source, field, fmt::format("{}, got {}", rule, d9d::detail::quote_json(v)));
      return v.get<int64_t>();
    };
    auto flag = [&] {
      if (!v.is_boolean()) fail(source, field, fmt::format("expected true or false, got {}", d9d::detail::quote_json(v)));
      return v.get<bool>();
    };
    if (field == "peft_type") {
      if (v != "OFT") fail(source, field, fmt::format("{} is not \"OFT\"", d9d::detail::quote_json(v)));
    } else if (field == "r") {
      c.r = integer("must be an integer >= 0");
    } else if (field == "oft_block_size") {
      c.oft_block_size = integer("must be an integer >= 0");
    } else if (field == "num_cayley_neumann_terms") {
      c.num_cayley_neumann_terms = integer("must be an integer >= 1");
    } else if (field == "module_dropout") {
      c.module_dropout = number("must be a number in [0, 1)");
    } else if (field == "eps") {
      c.eps = number("must be a finite number >= 0");
    } else if (field == "coft") {
      c.coft = flag();
    } else if (field == "block_share") {
      c.block_share = flag();
    } else if (field == "use_cayley_neumann") {
      c.use_cayley_neumann = flag();
    } else if (field == "init_weights") {
      c.init_weights = flag();
    } else if (field == "target_modules") {
      c.target_modules = parse_selector(v, source, field);
    } else if (field == "exclude_modules") {
      c.exclude_modules = parse_selector(v, source, field);
    } else if (field == "bias") {
      if (v != "none") {
        fail(source, field, fmt::format("{} is not supported: d9d-peft's OFT trains no bias (only \"none\" is); use an "
                                        "adapter without it",
                                        d9d::detail::quote_json(v)));
      }
    } else if (field == "fan_in_fan_out") {
      if (v != false) {
        fail(source, field, fmt::format("{} is not supported: OFT adapts torch.nn.Linear layers, whose weight is "
                                        "[out, in] (only false is)",
                                        d9d::detail::quote_json(v)));
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
      fail(source, field, fmt::format("{} is not supported: d9d-peft does not know this OFT field; use an adapter "
                                      "without it",
                                      d9d::detail::quote_json(v)));
    }
  }
  validate(c, source);
  return c;
}

std::string dump_oft_config(const OFTConfig& c) {
  json j = {{"auto_mapping", nullptr},      {"inference_mode", true},  {"layers_pattern", nullptr},
            {"layers_to_transform", nullptr}, {"modules_to_save", nullptr}, {"peft_type", "OFT"},
            {"peft_version", "0.21.0"},     {"revision", nullptr},     {"bias", "none"},
            {"fan_in_fan_out", false}};
  j["r"] = c.r;
  j["oft_block_size"] = c.oft_block_size;
  j["module_dropout"] = c.module_dropout;
  j["coft"] = c.coft;
  j["eps"] = c.eps;
  j["block_share"] = c.block_share;
  j["use_cayley_neumann"] = c.use_cayley_neumann;
  j["num_cayley_neumann_terms"] = c.num_cayley_neumann_terms;
  j["init_weights"] = c.init_weights;
  j["target_modules"] = selector_json(c.target_modules);
  j["exclude_modules"] = selector_json(c.exclude_modules);
  j["base_model_name_or_path"] = c.base_model_name_or_path ? json(*c.base_model_name_or_path) : json(nullptr);
  j["task_type"] = c.task_type ? json(*c.task_type) : json(nullptr);
  return j.dump(2);
}

}  // namespace d9d::peft::hf

namespace d9d::peft {

using nlohmann::json;

namespace {

const std::vector<std::string> kParams = {"r",           "oft_block_size",     "coft",
                                          "eps",         "block_share",        "use_cayley_neumann",
                                          "num_cayley_neumann_terms", "module_dropout", "init_weights"};

template <typename Json>
void write_config(Json& j, const OFTConfig& c) {
  j = Json::object();
  j["kind"] = OFTConfig::kind;
  j["module_name_pattern"] = c.module_name_pattern;
  Json params = Json::object();
  const OFTParameters& o = c.params;
  params["r"] = o.r();
  params["oft_block_size"] = o.oft_block_size();
  params["coft"] = o.coft();
  params["eps"] = o.eps();
  params["block_share"] = o.block_share();
  params["use_cayley_neumann"] = o.use_cayley_neumann();
  params["num_cayley_neumann_terms"] = o.num_cayley_neumann_terms();
  params["module_dropout"] = o.module_dropout();
  params["init_weights"] = o.init_weights();
  j["params"] = params;
}

}  // namespace

void validate(const OFTConfig& c, const std::string& path) {
  using config_json::field_path;
  config_json::validate_pattern(c.module_name_pattern, field_path(path, "module_name_pattern"));
  c.params.validate(field_path(path, "params"));
}

hf::OFTConfig to_peft_config(const OFTConfig& c) {
  hf::OFTConfig out;
  const OFTParameters& o = c.params;
  out.target_modules.regex = c.module_name_pattern;
  out.r = o.r();
  out.oft_block_size = o.oft_block_size();
  out.module_dropout = o.module_dropout();
  out.coft = o.coft();
  out.eps = o.eps();
  out.block_share = o.block_share();
  out.use_cayley_neumann = o.use_cayley_neumann();
  out.num_cayley_neumann_terms = o.num_cayley_neumann_terms();
  out.init_weights = o.init_weights();
  return out;
}

OFTConfig parse_oft_config_json(const json& j, const std::string& path) {
  using namespace config_json;
  check_object(j, path, {"kind", "module_name_pattern", "params"});
  OFTConfig c;
  c.module_name_pattern = get_string(require(j, path, "module_name_pattern"), field_path(path, "module_name_pattern"));
  const std::string params = field_path(path, "params");
  const json& p = require(j, path, "params");
  check_object(p, params, kParams);
  if (!p.contains("r") && !p.contains("oft_block_size")) {
    throw ConfigError(field_path(params, "oft_block_size"), "field required: give oft_block_size or r");
  }
  OFTParameters& o = c.params;
  // The one given decides; the other is 0 unless written too.
  o.r(p.contains("r") ? get_int(p["r"], field_path(params, "r")) : 0);
  o.oft_block_size(p.contains("oft_block_size") ? get_int(p["oft_block_size"], field_path(params, "oft_block_size")) : 0);
  if (p.contains("coft")) o.coft(get_bool(p["coft"], field_path(params, "coft")));
  if (p.contains("eps")) o.eps(get_number(p["eps"], field_path(params, "eps")));
  if (p.contains("block_share")) o.block_share(get_bool(p["block_share"], field_path(params, "block_share")));
  if (p.contains("use_cayley_neumann")) {
    o.use_cayley_neumann(get_bool(p["use_cayley_neumann"], field_path(params, "use_cayley_neumann")));
  }
  if (p.contains("num_cayley_neumann_terms")) {
    o.num_cayley_neumann_terms(get_int(p["num_cayley_neumann_terms"], field_path(params, "num_cayley_neumann_terms")));
  }
  if (p.contains("module_dropout")) o.module_dropout(get_number(p["module_dropout"], field_path(params, "module_dropout")));
  if (p.contains("init_weights")) o.init_weights(get_bool(p["init_weights"], field_path(params, "init_weights")));
  validate(c, path);
  return c;
}

void to_json(json& j, const OFTConfig& c) { write_config(j, c); }
void to_json(nlohmann::ordered_json& j, const OFTConfig& c) { write_config(j, c); }
void from_json(const json& j, OFTConfig& c) {
  config_json::check_kind(j, "", OFTConfig::kind);
  c = parse_oft_config_json(j, "");
}

}  // namespace d9d::peft
