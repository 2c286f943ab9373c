// Hugging Face PEFT's LoraConfig (adapter_config.json): parsing, checking
// every field, and writing it as PEFT 0.21 does.
#include <d9d/peft/errors.h>
#include <d9d/peft/adapters.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/config.h>
#include <d9d/peft/hf/module_selector.h>
#include <d9d/peft/lora/grouped_linear.h>
#include <d9d/peft/lora/layer.h>
#include <d9d/peft/pattern.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../../json_text.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include "config_rules.h"

namespace d9d::peft::hf {

using detail::check_pattern_key;
using detail::ends_with;
using detail::fail;
using detail::pattern_value;
using detail::regex_escape;

using nlohmann::json;

namespace {

/// The value PEFT writes for fields this library leaves at their default.
bool is_default_like(const json& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>()) || (v.is_object() && v.empty()) ||
         (v.is_array() && v.empty());
}


const std::set<std::string> kMetadataFields = {"auto_mapping", "revision",     "inference_mode",
                                               "peft_version", "megatron_core", "qalora_group_size"};

/// Fields that must keep their default (null/false/empty unless listed here).
const std::map<std::string, json> kFixedFields = {
    {"bias", "none"},
    {"fan_in_fan_out", false},
    {"modules_to_save", nullptr},
    {"layers_to_transform", nullptr},
    {"layers_pattern", nullptr},
    {"lora_bias", false},
    {"use_qalora", false},
    {"use_bdlora", nullptr},
    {"megatron_config", nullptr},
    {"loftq_config", json::object()},
    {"eva_config", nullptr},
    {"corda_config", nullptr},
    {"arrow_config", nullptr},
    {"kasa_config", nullptr},
    {"velora_config", nullptr},
    {"monteclora_config", nullptr},
    {"lora_ga_config", nullptr},
    {"alora_invocation_tokens", nullptr},
    {"layer_replication", nullptr},
    {"trainable_token_indices", nullptr},
    {"ensure_weight_tying", false},
};

}  // namespace

// ----------------------------------------------------------------- config


std::optional<LoRAParameters> LoraConfig::select(const std::string& name) const {
  if (!target_modules.matches(name) || exclude_modules.matches(name)) return std::nullopt;
  return LoRAParameters()
      .r(pattern_value(rank_pattern, name).value_or(r))
      .alpha(pattern_value(alpha_pattern, name).value_or(lora_alpha))
      .dropout(lora_dropout)
      .use_rslora(use_rslora)
      .use_dora(use_dora)
      .init(init)
      .pissa_niter(pissa_niter);
}

std::optional<LoRAParameters> LoraConfig::select_parameter(const std::string& name) const {
  const bool named = std::any_of(target_parameters.begin(), target_parameters.end(), [&](const std::string& entry) {
    return name == entry || ends_with(name, "." + entry);
  });
  if (!named) return std::nullopt;
  return LoRAParameters()
      .r(pattern_value(rank_pattern, name).value_or(r))
      .alpha(pattern_value(alpha_pattern, name).value_or(lora_alpha))
      .dropout(lora_dropout)
      .use_rslora(use_rslora)
      .use_dora(use_dora)
      .init(init)
      .pissa_niter(pissa_niter);
}

LoraConfig parse_lora_config(const json& j, const std::string& source) {
  if (!j.is_object()) fail(source, "", "expected a JSON object");
  LoraConfig c;
  for (const auto& item : j.items()) {
    const std::string& field = item.key();
    const json& v = item.value();
    auto number = [&](double lo, const char* rule) {
      if (!v.is_number() || !(v.get<double>() >= lo)) fail(source, field, fmt::format("{}, got {}", rule, d9d::detail::quote_json(v)));
      return v.get<double>();
    };
    auto flag = [&] {
      if (!v.is_boolean()) fail(source, field, fmt::format("expected true or false, got {}", d9d::detail::quote_json(v)));
      return v.get<bool>();
    };
    if (field == "peft_type") {
      if (v != "LORA") {
        fail(source, field, fmt::format("{} is not supported: d9d-peft reads LoRA adapters (\"LORA\") only", d9d::detail::quote_json(v)));
      }
    } else if (field == "r") {
      if (!v.is_number_integer() || v.get<int64_t>() < 1) fail(source, field, fmt::format("must be an integer >= 1, got {}", d9d::detail::quote_json(v)));
      c.r = v.get<int64_t>();
    } else if (field == "lora_alpha") {
      if (!v.is_number() || !(v.get<double>() > 0)) {
        fail(source, field, fmt::format("must be a finite number > 0, got {}", d9d::detail::quote_json(v)));
      }
      c.lora_alpha = v.get<double>();
    } else if (field == "lora_dropout") {
      c.lora_dropout = number(0.0, "must be a number in [0, 1)");
      if (c.lora_dropout >= 1.0) fail(source, field, fmt::format("must be a number in [0, 1), got {}", d9d::detail::quote_json(v)));
    } else if (field == "target_modules") {
      c.target_modules = parse_selector(v, source, field);
    } else if (field == "target_parameters") {
      if (v.is_null()) continue;
      if (!v.is_array()) {
        fail(source, field, fmt::format("expected a list of parameter names or null, got {}", d9d::detail::quote_json(v)));
      }
      for (const auto& entry : v) {
        if (!entry.is_string() || entry.get<std::string>().empty()) {
          fail(source, field, fmt::format("every entry must be a non-empty parameter name (PEFT 0.21 matches names, "
                                          "not regular expressions), got {}",
                                          d9d::detail::quote_json(entry)));
        }
        c.target_parameters.push_back(entry.get<std::string>());
      }
    } else if (field == "exclude_modules") {
      c.exclude_modules = parse_selector(v, source, field);
    } else if (field == "use_rslora") {
      c.use_rslora = flag();
    } else if (field == "use_dora") {
      c.use_dora = flag();
    } else if (field == "init_lora_weights") {
      if (v == true) c.init = LoRAInit::Default;
      else if (v == false) c.init = LoRAInit::Random;
      else {
        LoRAParameters p;
        const bool known = v.is_string() && v != "default" && v != "random" && parse_lora_init_name(v.get<std::string>(), p);
        if (!known) {
          fail(source, field, fmt::format("{} is not supported (supported: true, false, \"gaussian\", \"pissa\", "
                                          "\"pissa_niter_<n>\", \"olora\")",
                                          d9d::detail::quote_json(v)));
        }
        c.init = p.init();
        c.pissa_niter = p.pissa_niter();
      }
    } else if (field == "rank_pattern" || field == "alpha_pattern") {
      if (v.is_null()) continue;
      if (!v.is_object()) fail(source, field, fmt::format("expected an object, got {}", d9d::detail::quote_json(v)));
      for (const auto& p : v.items()) {
        if (field == "rank_pattern") {
          if (!p.value().is_number_integer() || p.value().get<int64_t>() < 1) {
            fail(source, field + "." + p.key(), fmt::format("must be an integer >= 1, got {}", d9d::detail::quote_json(p.value())));
          }
          c.rank_pattern.emplace_back(p.key(), p.value().get<int64_t>());
        } else {
          if (!p.value().is_number() || !(p.value().get<double>() > 0)) {
            fail(source, field + "." + p.key(), fmt::format("must be a number > 0, got {}", d9d::detail::quote_json(p.value())));
          }
          c.alpha_pattern.emplace_back(p.key(), p.value().get<double>());
        }
      }
    } else if (field == "base_model_name_or_path" || field == "task_type") {
      if (v.is_null()) continue;
      if (!v.is_string()) fail(source, field, fmt::format("expected a string or null, got {}", d9d::detail::quote_json(v)));
      (field == "task_type" ? c.task_type : c.base_model_name_or_path) = v.get<std::string>();
    } else if (kMetadataFields.count(field)) {
      // Bookkeeping that does not change the numbers.
    } else if (auto fixed = kFixedFields.find(field); fixed != kFixedFields.end()) {
      if (v != fixed->second && !is_default_like(v)) {
        fail(source, field, fmt::format("{} is not supported by d9d-peft (only {} is); use an adapter without it",
                                        d9d::detail::quote_json(v), d9d::detail::quote_json(fixed->second)));
      }
    } else if (!is_default_like(v)) {
      fail(source, field, fmt::format("{} is not supported: d9d-peft does not know this field; use an adapter "
                                      "without it",
                                      d9d::detail::quote_json(v)));
    }
  }
  validate(c, source);
  return c;
}

void validate(const LoraConfig& c, const std::string& source) {
  if (c.target_modules.empty() && c.target_parameters.empty()) {
    fail(source, "target_modules", "must name the modules to adapt (or target_parameters the expert parameters)");
  }
  if (!c.target_parameters.empty()) {
    // PEFT's ParamWrapper refuses these too: an adapter on a parameter has no dropout or DoRA.
    if (c.lora_dropout != 0) {
      fail(source, "lora_dropout",
           fmt::format("must be 0 with target_parameters (PEFT refuses dropout on parameters), got {}", c.lora_dropout));
    }
    if (c.use_dora) fail(source, "use_dora", "true is not supported with target_parameters (PEFT refuses it too)");
  }
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
  // JSON text such as 1e999 reads as infinity; a scale of inf or NaN would merge NaN into every weight.
  if (!(c.lora_alpha > 0) || !std::isfinite(c.lora_alpha)) {
    fail(source, "lora_alpha", fmt::format("must be a finite number > 0, got {}", c.lora_alpha));
  }
  if (!(c.lora_dropout >= 0 && c.lora_dropout < 1)) {
    fail(source, "lora_dropout", fmt::format("must be a number in [0, 1), got {}", c.lora_dropout));
  }
}

std::string dump_lora_config(const LoraConfig& c) {
  json j = {
      {"alora_invocation_tokens", nullptr}, {"arrow_config", nullptr}, {"auto_mapping", nullptr},
      {"bias", "none"}, {"corda_config", nullptr}, {"ensure_weight_tying", false}, {"eva_config", nullptr},
      {"fan_in_fan_out", false}, {"inference_mode", true}, {"kasa_config", nullptr},
      {"layer_replication", nullptr}, {"layers_pattern", nullptr}, {"layers_to_transform", nullptr},
      {"loftq_config", json::object()}, {"lora_bias", false}, {"lora_ga_config", nullptr},
      {"megatron_config", nullptr}, {"megatron_core", "megatron.core"}, {"modules_to_save", nullptr},
      {"monteclora_config", nullptr}, {"peft_type", "LORA"}, {"peft_version", "0.21.0"},
      {"qalora_group_size", 16}, {"revision", nullptr},
      {"trainable_token_indices", nullptr}, {"use_bdlora", nullptr}, {"use_qalora", false},
      {"velora_config", nullptr},
  };
  j["r"] = c.r;
  // An integral alpha as PEFT writes it (16, not 16.0), where int64 holds it exactly;
  // beyond 2^53 as the number it is (1e+300), never cast out of int64's range.
  if (c.lora_alpha == std::floor(c.lora_alpha) && std::abs(c.lora_alpha) <= 9007199254740992.0) {
    j["lora_alpha"] = static_cast<int64_t>(c.lora_alpha);
  } else {
    j["lora_alpha"] = c.lora_alpha;
  }
  j["lora_dropout"] = c.lora_dropout;
  j["target_modules"] = selector_json(c.target_modules);
  j["exclude_modules"] = selector_json(c.exclude_modules);
  j["target_parameters"] = c.target_parameters.empty() ? json(nullptr) : json(c.target_parameters);
  j["use_rslora"] = c.use_rslora;
  j["use_dora"] = c.use_dora;
  if (c.init == LoRAInit::Default || c.init == LoRAInit::Random) {
    j["init_lora_weights"] = c.init == LoRAInit::Default;
  } else {
    j["init_lora_weights"] = lora_init_name(LoRAParameters().init(c.init).pissa_niter(c.pissa_niter));
  }
  j["rank_pattern"] = json::object();
  for (const auto& [k, v] : c.rank_pattern) j["rank_pattern"][k] = v;
  j["alpha_pattern"] = json::object();
  for (const auto& [k, v] : c.alpha_pattern) j["alpha_pattern"][k] = v;
  j["base_model_name_or_path"] = c.base_model_name_or_path ? json(*c.base_model_name_or_path) : json(nullptr);
  j["task_type"] = c.task_type ? json(*c.task_type) : json(nullptr);
  return j.dump(2);
}

LoraConfig lora_config_of(const torch::nn::Module& module, const std::string& adapter_name,
                          const SaveAdapterOptions& options) {
  LoraConfig config;
  config.base_model_name_or_path = options.base_model_name_or_path;
  config.task_type = options.task_type;
  std::string first;
  for (const auto& entry : adapter_layers(module)) {
    if (!entry.layer->has_adapter(adapter_name)) continue;
    const auto* adapter = entry.layer->adapter_module(adapter_name).get();
    const LoRAParameters* o = nullptr;
    if (const auto* a = dynamic_cast<const LoRALinearAdapterImpl*>(adapter)) o = &a->options();
    if (const auto* a = dynamic_cast<const LoRAEmbeddingAdapterImpl*>(adapter)) o = &a->options();
    if (const auto* a = dynamic_cast<const LoRAConv2dAdapterImpl*>(adapter)) o = &a->options();
    const auto* grouped = dynamic_cast<const LoRAGroupedLinearAdapterImpl*>(adapter);
    if (grouped) o = &grouped->options();
    if (!o) {
      throw PeftError(fmt::format("save_adapter: '{}' holds adapter \"{}\" of another method ({}); a LoRA config "
                                  "cannot describe it",
                                  entry.name, adapter_name, entry.layer->peft_type()));
    }
    if (grouped && o->dropout() != 0) {
      throw PeftError(fmt::format("save_adapter: '{}' is a LoRA layer on grouped experts with dropout {}; PEFT writes "
                                  "such layers as target_parameters, which take no dropout. Nothing was written: "
                                  "merge the adapter (merge_peft), or train the experts' adapter without dropout",
                                  entry.name, o->dropout()));
    }
    // Converted (SaveAdapterOptions::convert_to_lora): [A; A0] and [B, -B0] at twice the rank, the same scale.
    const bool convert = options.convert_to_lora && init_changes_base(o->init());
    const int64_t r = convert ? 2 * o->r() : o->r();
    const double alpha = convert ? (o->use_rslora() ? o->alpha() * std::sqrt(2.0) : 2 * o->alpha()) : o->alpha();
    const LoRAInit init = convert ? LoRAInit::Default : o->init();
    // Grouped experts are PEFT's 3-D expert parameters: named by their full
    // path, which PEFT matches as a suffix of "<module>.<parameter>".
    (grouped ? config.target_parameters : config.target_modules.names).push_back(entry.name);
    if (first.empty()) {
      first = entry.name;
      config.init = init;
      config.pissa_niter = convert ? 0 : o->pissa_niter();
      config.r = r;
      config.lora_alpha = alpha;
      config.lora_dropout = o->dropout();
      config.use_rslora = o->use_rslora();
      config.use_dora = o->use_dora();
      continue;
    }
    if (o->dropout() != config.lora_dropout || o->use_rslora() != config.use_rslora) {
      throw PeftError(fmt::format("save_adapter: '{}' differs from '{}' in dropout or rsLoRA, which a PEFT config "
                                  "cannot express per module",
                                  entry.name, first));
    }
    if (o->use_dora() != config.use_dora) {
      throw PeftError(fmt::format("save_adapter: '{}' differs from '{}' in DoRA, which a PEFT config cannot express "
                                  "per module",
                                  entry.name, first));
    }
    if (init != config.init || (!convert && o->pissa_niter() != config.pissa_niter)) {
      throw PeftError(fmt::format("save_adapter: '{}' differs from '{}' in its initialisation (init_lora_weights), "
                                  "which a PEFT config cannot express per module",
                                  entry.name, first));
    }
    if (r != config.r) config.rank_pattern.emplace_back(regex_escape(entry.name), r);
    if (alpha != config.lora_alpha) config.alpha_pattern.emplace_back(regex_escape(entry.name), alpha);
  }
  if (first.empty()) throw PeftError(fmt::format("save_adapter: no layer holds adapter \"{}\"", adapter_name));
  return config;
}

}  // namespace d9d::peft::hf
