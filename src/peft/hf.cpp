// Hugging Face PEFT adapters: adapter_config.json and adapter_model.safetensors.
#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/io/source.h>
#include <d9d/peft/applicator.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/config.h>
#include <d9d/peft/lora/adapters.h>
#include <d9d/peft/lora/method.h>
#include <d9d/peft/module_tree.h>

#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/module.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../json_text.h"

#include <filesystem>
#include <fstream>
#include <regex>
#include <set>

namespace d9d::peft::hf {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

[[noreturn]] void fail(const std::string& source, const std::string& field, const std::string& rule) {
  throw ConfigError(source + ": " + field, rule);
}

/// The value PEFT writes for fields this library leaves at their default.
bool is_default_like(const json& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>()) || (v.is_object() && v.empty()) ||
         (v.is_array() && v.empty());
}

ModuleSelector parse_selector(const json& v, const std::string& source, const std::string& field) {
  ModuleSelector s;
  if (v.is_null()) return s;
  if (v.is_string()) {
    s.regex = v.get<std::string>();
    try {
      std::regex check(*s.regex, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      fail(source, field, fmt::format("invalid regular expression \"{}\": {}", *s.regex, e.what()));
    }
    return s;
  }
  if (!v.is_array()) fail(source, field, fmt::format("expected a list of names or a regex string, got {}", d9d::detail::quote_json(v)));
  for (const auto& item : v) {
    if (!item.is_string()) fail(source, field, fmt::format("expected names, got {}", d9d::detail::quote_json(item)));
    s.names.push_back(item.get<std::string>());
  }
  return s;
}

json selector_json(const ModuleSelector& s) {
  if (s.regex) return *s.regex;
  if (s.names.empty()) return nullptr;
  return s.names;
}

/// PEFT's get_pattern_key: the first key whose regex `(.*\.)?(key)` matches the whole name.
template <typename T>
std::optional<T> pattern_value(const std::vector<std::pair<std::string, T>>& patterns, const std::string& name) {
  for (const auto& [key, value] : patterns) {
    if (key == name || std::regex_match(name, std::regex("(.*\\.)?(" + key + ")"))) return value;
  }
  return std::nullopt;
}

std::string regex_escape(const std::string& s) {
  static const std::string specials = R"(\^$.|?*+()[]{})";
  std::string out;
  for (char c : s) {
    if (specials.find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
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
    {"target_parameters", nullptr},
    {"ensure_weight_tying", false},
};

}  // namespace

// ----------------------------------------------------------------- config

bool ModuleSelector::matches(const std::string& name) const {
  if (regex) return std::regex_match(name, std::regex(*regex, std::regex::ECMAScript));
  for (const auto& target : names) {
    if (name == target || ends_with(name, "." + target)) return true;
  }
  return false;
}

std::optional<LoRALayerOptions> LoraConfig::select(const std::string& name) const {
  if (!target_modules.matches(name) || exclude_modules.matches(name)) return std::nullopt;
  LoRALayerOptions o;
  o.r = pattern_value(rank_pattern, name).value_or(r);
  o.alpha = pattern_value(alpha_pattern, name).value_or(lora_alpha);
  o.dropout = lora_dropout;
  o.use_rslora = use_rslora;
  o.use_dora = use_dora;
  o.init = init;
  return o;
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
      c.lora_alpha = number(1e-12, "must be a number > 0");
    } else if (field == "lora_dropout") {
      c.lora_dropout = number(0.0, "must be a number in [0, 1)");
      if (c.lora_dropout >= 1.0) fail(source, field, fmt::format("must be a number in [0, 1), got {}", d9d::detail::quote_json(v)));
    } else if (field == "target_modules") {
      c.target_modules = parse_selector(v, source, field);
    } else if (field == "exclude_modules") {
      c.exclude_modules = parse_selector(v, source, field);
    } else if (field == "use_rslora") {
      c.use_rslora = flag();
    } else if (field == "use_dora") {
      c.use_dora = flag();
    } else if (field == "init_lora_weights") {
      if (v == true) c.init = LoRAInit::Default;
      else if (v == false) c.init = LoRAInit::Random;
      else if (v == "gaussian") c.init = LoRAInit::Gaussian;
      else fail(source, field, fmt::format("{} is not supported (supported: true, false, \"gaussian\")", d9d::detail::quote_json(v)));
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
  if (c.target_modules.empty()) fail(source, "target_modules", "must name the modules to adapt");
  return c;
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
      {"qalora_group_size", 16}, {"revision", nullptr}, {"target_parameters", nullptr},
      {"trainable_token_indices", nullptr}, {"use_bdlora", nullptr}, {"use_qalora", false},
      {"velora_config", nullptr},
  };
  j["r"] = c.r;
  if (c.lora_alpha == std::floor(c.lora_alpha)) j["lora_alpha"] = static_cast<int64_t>(c.lora_alpha);
  else j["lora_alpha"] = c.lora_alpha;
  j["lora_dropout"] = c.lora_dropout;
  j["target_modules"] = selector_json(c.target_modules);
  j["exclude_modules"] = selector_json(c.exclude_modules);
  j["use_rslora"] = c.use_rslora;
  j["use_dora"] = c.use_dora;
  j["init_lora_weights"] = c.init == LoRAInit::Gaussian ? json("gaussian") : json(c.init == LoRAInit::Default);
  j["rank_pattern"] = json::object();
  for (const auto& [k, v] : c.rank_pattern) j["rank_pattern"][k] = v;
  j["alpha_pattern"] = json::object();
  for (const auto& [k, v] : c.alpha_pattern) j["alpha_pattern"][k] = v;
  j["base_model_name_or_path"] = c.base_model_name_or_path ? json(*c.base_model_name_or_path) : json(nullptr);
  j["task_type"] = c.task_type ? json(*c.task_type) : json(nullptr);
  return j.dump(2);
}

// ----------------------------------------------------------------- method

HfLoRA::HfLoRA(LoraConfig config, std::string adapter_name)
    : PeftMethod(std::move(config)), adapter_name_(std::move(adapter_name)) {
  validate_adapter_name(adapter_name_);
}

PeftInjectionResult HfLoRA::inject(torch::nn::Module& module) {
  LoRATargeting targeting;
  targeting.adapter_name = adapter_name_;
  targeting.what = fmt::format("target_modules {}", selector_json(config_.target_modules).dump());
  targeting.hint = "a target name matches a whole module name or its last dotted parts, a regex the whole name";
  targeting.select = [this](const std::string& name) { return config_.select(name); };
  return inject_lora(module, targeting);
}

void HfLoRA::merge(torch::nn::Module& module) {
  merge_lora(
      module, [this](const std::string& name) { return config_.select(name).has_value(); }, adapter_name_);
}

// ------------------------------------------------------------- state dict

namespace {

/// One adapter of one LoRA layer: the layer's qualified name, the adapter
/// module (its parameter names are PEFT's keys relative to the layer) and
/// its options.
struct AdapterAt {
  std::string layer;
  std::shared_ptr<torch::nn::Module> adapter;
  LoRALayerOptions options;
  bool embedding = false;
};

std::vector<AdapterAt> adapters_named(const torch::nn::Module& module, const std::string& adapter_name) {
  std::vector<AdapterAt> out;
  for (const auto& entry : list_modules(const_cast<torch::nn::Module&>(module), /*enter_adapters=*/false)) {
    if (auto linear = std::dynamic_pointer_cast<LoRALinearImpl>(entry.module)) {
      if (auto a = linear->find(adapter_name)) out.push_back({entry.name, a, a->options(), false});
    } else if (auto embedding = std::dynamic_pointer_cast<LoRAEmbeddingImpl>(entry.module)) {
      if (auto a = embedding->find(adapter_name)) out.push_back({entry.name, a, a->options(), true});
    }
  }
  return out;
}

/// `name`, or the model's only adapter when `name` is empty.
std::string resolve_adapter(const torch::nn::Module& module, const std::string& name, const std::string& what) {
  const auto names = lora_adapter_names(module);
  auto listed = [&] { return "\"" + fmt::format("{}", fmt::join(names, "\", \"")) + "\""; };
  if (names.empty()) throw PeftError(fmt::format("{}: the model holds no LoRA adapter", what));
  if (name.empty()) {
    if (names.size() == 1) return names.front();
    throw PeftError(fmt::format("{}: the model holds several adapters ({}); name the one you mean", what, listed()));
  }
  if (std::find(names.begin(), names.end(), name) == names.end()) {
    throw PeftError(fmt::format("{}: the model has no adapter \"{}\"; its adapters: {}", what, name, listed()));
  }
  return name;
}

/// In-model adapter keys without the adapter name (`layers.0.q_proj.lora_A.weight`) to their tensors.
model_state::StateDict adapter_tensors(const torch::nn::Module& module, const std::string& adapter_name) {
  model_state::StateDict out;
  for (const auto& a : adapters_named(module, adapter_name)) {
    for (const auto& p : a.adapter->named_parameters()) out.emplace(a.layer + "." + p.key(), p.value());
  }
  return out;
}

}  // namespace

model_state::StateDict get_peft_model_state_dict(const torch::nn::Module& module, const std::string& adapter_name) {
  const std::string adapter = resolve_adapter(module, adapter_name, "get_peft_model_state_dict");
  model_state::StateDict out;
  for (const auto& [key, tensor] : adapter_tensors(module, adapter)) out.emplace(kPeftKeyPrefix + key, tensor.detach());
  return out;
}

void set_peft_model_state_dict(torch::nn::Module& module, const model_state::StateDict& state,
                               const std::string& source, const std::string& adapter_name) {
  const std::string adapter = resolve_adapter(module, adapter_name, source);
  const model_state::StateDict targets = adapter_tensors(module, adapter);
  std::map<std::string, at::Tensor> given;
  std::vector<std::string> unexpected, missing, mismatched;
  for (const auto& [key, tensor] : state) {
    std::string k = key.rfind(kPeftKeyPrefix, 0) == 0 ? key.substr(kPeftKeyPrefix.size()) : key;
    auto it = targets.find(k);
    if (it == targets.end()) {
      unexpected.push_back(key);
    } else if (tensor.sizes() != it->second.sizes()) {
      mismatched.push_back(fmt::format("{}: file [{}], model [{}]", key, fmt::join(tensor.sizes(), ", "),
                                       fmt::join(it->second.sizes(), ", ")));
    } else {
      given.emplace(k, tensor);
    }
  }
  for (const auto& item : targets) {
    if (!given.count(item.first) &&
        std::none_of(mismatched.begin(), mismatched.end(),
                     [&](const std::string& m) { return m.find(item.first + ":") != std::string::npos; })) {
      missing.push_back(item.first);
    }
  }
  if (!unexpected.empty() || !missing.empty() || !mismatched.empty()) {
    std::string msg = fmt::format("{}: the adapter does not fit the model (nothing was loaded)", source);
    if (!mismatched.empty()) {
      msg += fmt::format("\n  shapes differ (wrong base model?): {}", fmt::join(mismatched, "; "));
    }
    if (!unexpected.empty()) {
      msg += fmt::format("\n  keys with no LoRA layer in the model: {}", fmt::join(unexpected, ", "));
    }
    if (!missing.empty()) msg += fmt::format("\n  LoRA weights the adapter lacks: {}", fmt::join(missing, ", "));
    throw PeftError(msg);
  }
  torch::NoGradGuard no_grad;
  for (const auto& [key, tensor] : given) {
    at::Tensor target = targets.at(key);
    target.copy_(tensor);
  }
}

// ------------------------------------------------------------------ files

namespace {

LoraConfig read_adapter_config(const std::string& dir) {
  const fs::path config_path = fs::path(dir) / "adapter_config.json";
  if (!fs::exists(config_path)) {
    throw PeftError(fmt::format("{}: no adapter_config.json (a Hugging Face PEFT adapter directory holds "
                                "adapter_config.json and adapter_model.safetensors)",
                                dir));
  }
  json j;
  try {
    std::ifstream in(config_path);
    j = json::parse(in);
  } catch (const json::exception& e) {
    throw ConfigError(config_path.string(), fmt::format("not valid JSON: {}", e.what()));
  }
  return parse_lora_config(j, config_path.string());
}

/// Adds the method's adapter: through `inject_peft_and_freeze` into a model
/// without adapters, else beside the existing ones (inactive, frozen).
void add_method(HfLoRA& method, torch::nn::Module& module, const std::string& what) {
  const auto names = lora_adapter_names(module);
  if (names.empty()) {
    inject_peft_and_freeze(method, module);
    return;
  }
  if (std::find(names.begin(), names.end(), method.adapter_name()) != names.end()) {
    throw PeftError(fmt::format("{}: the model already holds an adapter \"{}\"; pass another adapter_name, or "
                                "delete_adapter(\"{}\") first",
                                what, method.adapter_name(), method.adapter_name()));
  }
  method.inject(module);
}

}  // namespace

std::unique_ptr<PeftMethodBase> load_adapter(torch::nn::Module& module, const std::string& dir,
                                             const std::string& adapter_name) {
  const std::string what = fmt::format("load_adapter('{}', adapter \"{}\")", dir, adapter_name);
  auto method = std::make_unique<HfLoRA>(read_adapter_config(dir), adapter_name);

  fs::path weights = fs::path(dir) / "adapter_model.safetensors";
  if (!fs::exists(weights) && fs::exists(fs::path(dir) / "adapter_model.bin")) weights = fs::path(dir) / "adapter_model.bin";
  const auto source = model_state::open_checkpoint(weights.string());
  model_state::StateDict state;
  for (const auto& key : source->keys()) state.emplace(key, source->read(key));

  add_method(*method, module, what);
  try {
    set_peft_model_state_dict(module, state, weights.string(), adapter_name);
  } catch (...) {
    delete_adapter(module, adapter_name);  // nothing merged: the model is as it was
    throw;
  }
  return method;
}

std::unique_ptr<PeftMethodBase> add_adapter(torch::nn::Module& module, const std::string& adapter_name,
                                            const LoraConfig& config) {
  auto method = std::make_unique<HfLoRA>(config, adapter_name);
  add_method(*method, module, fmt::format("add_adapter(\"{}\")", adapter_name));
  return method;
}

void save_adapter(const torch::nn::Module& module, const std::string& dir, const SaveAdapterOptions& options) {
  const std::string adapter = resolve_adapter(module, options.adapter_name, fmt::format("save_adapter('{}')", dir));
  const auto layers = adapters_named(module, adapter);
  LoraConfig config;
  config.base_model_name_or_path = options.base_model_name_or_path;
  config.task_type = options.task_type;
  bool first = true;
  for (const auto& at : layers) {
    const std::string& name = at.layer;
    const LoRALayerOptions& o = at.options;
    config.target_modules.names.push_back(name);
    if (first) {
      config.r = o.r;
      config.lora_alpha = o.alpha;
      config.lora_dropout = o.dropout;
      config.use_rslora = o.use_rslora;
      config.use_dora = o.use_dora;
      first = false;
      continue;
    }
    if (o.dropout != config.lora_dropout || o.use_rslora != config.use_rslora) {
      throw PeftError(fmt::format("save_adapter: '{}' differs from '{}' in dropout or rsLoRA, which a PEFT config "
                                  "cannot express per module",
                                  name, layers.front().layer));
    }
    if (o.use_dora != config.use_dora) {
      throw PeftError(fmt::format("save_adapter: '{}' differs from '{}' in DoRA, which a PEFT config cannot express "
                                  "per module",
                                  name, layers.front().layer));
    }
    if (o.r != config.r) config.rank_pattern.emplace_back(regex_escape(name), o.r);
    if (o.alpha != config.lora_alpha) config.alpha_pattern.emplace_back(regex_escape(name), o.alpha);
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  model_state::StateDict tensors;
  for (const auto& [key, tensor] : get_peft_model_state_dict(module, adapter)) tensors.emplace(key, tensor);
  model_state::save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), tensors, {{"format", "pt"}});
  model_state::write_file_atomically((fs::path(dir) / "adapter_config.json").string(), dump_lora_config(config));
}

}  // namespace d9d::peft::hf
