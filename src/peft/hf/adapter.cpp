// Hugging Face PEFT adapters in a model: the LoRA method a config describes,
// adapter state dicts, and loading, adding and saving adapter directories.
#include <d9d/model_state/io/safetensors.h>
#include <d9d/peft/adapters.h>
#include <d9d/peft/applicator.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/files.h>
#include <d9d/peft/lora/linear.h>
#include <d9d/nn/grouped_linear.h>
#include <d9d/peft/lora/grouped_linear.h>
#include <d9d/peft/lora/method.h>
#include <d9d/peft/registry.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/module.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../rollback.h"
#include "config_rules.h"
#include "grouped_keys.h"
#include "shared_state.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

namespace d9d::peft::hf {

namespace fs = std::filesystem;

// ----------------------------------------------------------------- method

HfLoRA::HfLoRA(LoraConfig config, std::string adapter_name)
    : PeftMethod(std::move(config)), adapter_name_(std::move(adapter_name)) {
  validate(config_);
  validate_adapter_name(adapter_name_);
}

namespace {

bool is_grouped_layer(const torch::nn::Module& m) {
  return m.as<d9d::nn::GroupedLinearImpl>() != nullptr || m.as<LoRAGroupedLinearImpl>() != nullptr;
}

}  // namespace

PeftInjectionResult HfLoRA::inject(torch::nn::Module& module) {
  LoRATargeting targeting;
  targeting.adapter_name = adapter_name_;
  if (config_.target_parameters.empty()) {
    targeting.what = fmt::format("target_modules {}", config_.target_modules.describe());
    targeting.hint = "a target name matches a whole module name or its last dotted parts, a regex the whole name";
    targeting.select = [this](const std::string& name) { return config_.select(name); };
    return inject_lora(module, targeting);
  }
  // target_parameters: PEFT's 3-D expert parameters are the grouped layers
  // here, selected by these names alone; target_modules selects the others.
  std::set<std::string> grouped;
  for (const auto& item : module.named_modules()) {
    if (is_grouped_layer(*item.value())) grouped.insert(item.key());
  }
  for (const auto& entry : config_.target_parameters) {
    const bool found = std::any_of(grouped.begin(), grouped.end(), [&](const std::string& name) {
      return name == entry || detail::ends_with(name, "." + entry);
    });
    if (!found) {
      std::vector<std::string> some(grouped.begin(), grouped.end());
      if (some.size() > 6) some.resize(6);
      throw PeftError(fmt::format(
          "LoRA: target_parameters entry \"{}\" matches no grouped expert layer (d9d::nn::GroupedLinear) of the model; "
          "an entry names the layer whose .weight is the expert parameter, by its full name or its last dotted parts. "
          "{}",
          entry,
          some.empty() ? std::string("The model has no grouped layers.")
                       : fmt::format("Grouped layers: '{}'{}", fmt::join(some, "', '"), grouped.size() > 6 ? ", ..." : "")));
    }
  }
  targeting.what = fmt::format("target_modules {} / target_parameters [\"{}\"]", config_.target_modules.describe(),
                               fmt::join(config_.target_parameters, "\", \""));
  targeting.hint = "a target_parameters entry matches a grouped layer's whole name or its last dotted parts";
  targeting.select = [this, grouped](const std::string& name) -> std::optional<LoRAParameters> {
    return grouped.count(name) ? config_.select_parameter(name) : config_.select(name);
  };
  return inject_lora(module, targeting);
}

void HfLoRA::merge(torch::nn::Module& module) {
  merge_adapter(
      module,
      [this](const std::string& name) {
        return config_.select(name).has_value() || config_.select_parameter(name).has_value();
      },
      adapter_name_);
}

// ------------------------------------------------------------- state dict

namespace {

/// `name`, or the model's only adapter when `name` is empty.
std::string resolve_adapter(const torch::nn::Module& module, const std::string& name, const std::string& what) {
  const auto names = adapter_names(module);
  auto listed = [&] { return fmt::format("\"{}\"", fmt::join(names, "\", \"")); };
  if (names.empty()) throw PeftError(fmt::format("{}: the model holds no adapter", what));
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
/// Grouped expert layers are left out: their file form is PEFT's target_parameters one (grouped_keys.h).
model_state::StateDict adapter_tensors(const torch::nn::Module& module, const std::string& adapter_name) {
  model_state::StateDict out;
  for (const auto& entry : adapter_layers(module)) {
    if (!entry.layer->has_adapter(adapter_name)) continue;
    if (dynamic_cast<const LoRAGroupedLinearAdapterImpl*>(entry.layer->adapter_module(adapter_name).get())) continue;
    for (const auto& p : entry.layer->adapter_module(adapter_name)->named_parameters()) {
      out.emplace(entry.name + "." + p.key(), p.value());
    }
  }
  return out;
}

std::string shape_str(at::IntArrayRef sizes) { return fmt::format("[{}]", fmt::join(sizes, ", ")); }

}  // namespace

model_state::StateDict get_peft_model_state_dict(const torch::nn::Module& module, const std::string& adapter_name,
                                                 const ExpertOptions& experts) {
  const std::string adapter = resolve_adapter(module, adapter_name, "get_peft_model_state_dict");
  model_state::StateDict out;
  for (const auto& [key, tensor] : adapter_tensors(module, adapter)) out.emplace(kPeftKeyPrefix + key, tensor.detach());
  for (const auto& [key, shared] : detail::shared_state(module, adapter)) {
    if (shared.in_files) out.emplace(key, shared.tensors.front().detach());
  }
  for (const auto& slot : detail::grouped_slots(module, adapter)) {
    auto [a, b] = detail::to_peft_factors(slot, experts);
    out.emplace(kPeftKeyPrefix + slot.prefix + "lora_A.weight", a);
    out.emplace(kPeftKeyPrefix + slot.prefix + "lora_B.weight", b);
  }
  return out;
}

void set_peft_model_state_dict(torch::nn::Module& module, const model_state::StateDict& state,
                               const std::string& source, const std::string& adapter_name,
                               const ExpertOptions& experts) {
  const std::string adapter = resolve_adapter(module, adapter_name, source);
  model_state::StateDict targets = adapter_tensors(module, adapter);
  std::map<std::string, at::Tensor> given;
  std::set<std::string> mismatched_keys;
  std::vector<std::string> unexpected, missing, mismatched;
  // Grouped expert layers: PEFT's target_parameters keys and layout, converted
  // to the layer's [E, in, r] / [E, r, out] (shapes and values checked there).
  std::map<std::string, std::string> file_key;  // "<prefix>lora_A.weight" (no base_model.model.) -> key as given
  for (const auto& item : state) {
    const std::string& key = item.first;
    file_key.emplace(key.rfind(kPeftKeyPrefix, 0) == 0 ? key.substr(kPeftKeyPrefix.size()) : key, key);
  }
  std::set<std::string> consumed;
  for (const auto& slot : detail::grouped_slots(module, adapter)) {
    const std::string ka = slot.prefix + "lora_A.weight", kb = slot.prefix + "lora_B.weight";
    const auto fa = file_key.find(ka), fb = file_key.find(kb);
    if (fa == file_key.end() || fb == file_key.end()) {
      for (const auto* k : {&ka, &kb}) {
        if (!file_key.count(*k)) {
          missing.push_back(fmt::format("{}{} (the factors of grouped layer '{}', PEFT's target_parameters form)",
                                        kPeftKeyPrefix, *k, slot.layer));
        }
      }
      for (const auto& it : {fa, fb}) {
        if (it != file_key.end()) consumed.insert(it->second);
      }
      continue;
    }
    consumed.insert(fa->second);
    consumed.insert(fb->second);
    auto [a, b] = detail::from_peft_factors(slot, state.at(fa->second), state.at(fb->second), experts, source,
                                            fa->second, fb->second);
    given.emplace(slot.layer + ".lora_A.weight", a);
    given.emplace(slot.layer + ".lora_B.weight", b);
    targets.emplace(slot.layer + ".lora_A.weight", slot.adapter->lora_A->weight);
    targets.emplace(slot.layer + ".lora_B.weight", slot.adapter->lora_B->weight);
  }
  // State the adapter's layers share (VeRA's projections), held once: `base_model.<key>`.
  const auto shared = detail::shared_state(module, adapter);
  std::map<std::string, at::Tensor> given_shared;
  std::vector<std::string> disagreeing;
  for (const auto& [key, tensor] : state) {
    const std::string k = shared.count(key) ? key : "base_model." + key;
    const auto it = shared.find(k);
    if (it == shared.end()) continue;
    consumed.insert(key);
    const at::Tensor& held = it->second.tensors.front();
    if (tensor.sizes() != held.sizes()) {
      mismatched.push_back(fmt::format("{}: file {}, model {}", key, shape_str(tensor.sizes()), shape_str(held.sizes())));
      mismatched_keys.insert(k);
    } else if (it->second.in_files) {
      given_shared.emplace(k, tensor);
    } else if (!at::equal(tensor.to(held.device(), held.scalar_type()), held)) {
      // The method rebuilt it (VeRA: save_projection false), and PEFT ignores the file's: refuse a disagreement.
      disagreeing.push_back(key);
      mismatched_keys.insert(k);
    }
  }
  for (const auto& [key, entry] : shared) {
    if (entry.in_files && !given_shared.count(key) && !mismatched_keys.count(key)) {
      missing.push_back(key + " (shared by every layer of the adapter)");
    }
  }
  for (const auto& [key, tensor] : state) {
    if (consumed.count(key)) continue;
    std::string k = key.rfind(kPeftKeyPrefix, 0) == 0 ? key.substr(kPeftKeyPrefix.size()) : key;
    auto it = targets.find(k);
    if (it == targets.end()) {
      unexpected.push_back(key);
    } else if (tensor.sizes() != it->second.sizes()) {
      mismatched.push_back(fmt::format("{}: file {}, model {}", key, shape_str(tensor.sizes()),
                                       shape_str(it->second.sizes())));
      mismatched_keys.insert(k);
    } else {
      given.emplace(k, tensor);
    }
  }
  for (const auto& item : targets) {
    if (!given.count(item.first) && !mismatched_keys.count(item.first)) missing.push_back(item.first);
  }
  std::sort(missing.begin(), missing.end());
  if (!unexpected.empty() || !missing.empty() || !mismatched.empty() || !disagreeing.empty()) {
    std::string msg = fmt::format("{}: the adapter does not fit the model (nothing was loaded)", source);
    if (!mismatched.empty()) {
      msg += fmt::format("\n  shapes differ (wrong base model?): {}", fmt::join(mismatched, "; "));
    }
    if (!unexpected.empty()) {
      msg += fmt::format("\n  keys with no adapter layer in the model: {}", fmt::join(unexpected, ", "));
    }
    if (!missing.empty()) msg += fmt::format("\n  weights the adapter lacks: {}", fmt::join(missing, ", "));
    if (!disagreeing.empty()) {
      msg += fmt::format("\n  state the adapter's config says is rebuilt rather than read (VeRA: save_projection "
                         "false), whose values in the file differ from the rebuilt ones: {}; set save_projection true "
                         "to use the file's",
                         fmt::join(disagreeing, ", "));
    }
    throw PeftError(msg);
  }
  torch::NoGradGuard no_grad;
  for (const auto& [key, tensor] : given) {
    at::Tensor target = targets.at(key);
    target.copy_(tensor);
  }
  for (const auto& [key, tensor] : given_shared) {
    for (at::Tensor target : shared.at(key).tensors) target.copy_(tensor);
  }
}

// ------------------------------------------------------------------ files

namespace {

/// Adds the method's adapter: through `inject_peft_and_freeze` into a model
/// without adapters, else beside the existing ones (inactive, frozen).
void add_method(PeftMethodBase& method, const std::string& adapter_name, torch::nn::Module& module,
                const std::string& what) {
  const auto names = adapter_names(module);
  if (names.empty()) {
    inject_peft_and_freeze(method, module);
    return;
  }
  if (std::find(names.begin(), names.end(), adapter_name) != names.end()) {
    throw PeftError(fmt::format("{}: the model already holds an adapter \"{}\"; pass another adapter_name, or "
                                "delete_adapter(\"{}\") first",
                                what, adapter_name, adapter_name));
  }
  method.inject(module);
}

}  // namespace

std::unique_ptr<PeftMethodBase> load_adapter(torch::nn::Module& module, const std::string& dir,
                                             const std::string& adapter_name, const ExpertOptions& experts) {
  const std::string what = fmt::format("load_adapter('{}', adapter \"{}\")", dir, adapter_name);
  validate_adapter_name(adapter_name);
  const AdapterFiles files = read_adapter_files(dir);
  auto method = method_for_peft_type(files.peft_type, files.config_path)
                    .load_hf_config(files.config, files.config_path, adapter_name);

  InjectionSnapshot snapshot(module);
  try {
    add_method(*method, adapter_name, module, what);
    set_peft_model_state_dict(module, files.tensors, files.weights_path, adapter_name, experts);
  } catch (...) {
    snapshot.restore();  // nothing merged, every flag as it was
    throw;
  }
  return method;
}

std::unique_ptr<PeftMethodBase> add_adapter(torch::nn::Module& module, const std::string& adapter_name,
                                            const LoraConfig& config) {
  auto method = std::make_unique<HfLoRA>(config, adapter_name);
  add_method(*method, adapter_name, module, fmt::format("add_adapter(\"{}\")", adapter_name));
  return method;
}

namespace {

/// PEFT's `subtract_mutated_init`: each PiSSA or OLoRA layer's `A`, `B` become
/// `[A; A0]`, `[B, -B0]`, a plain LoRA of twice the rank that changes the
/// original base weight as the adapter changes the residual.
void convert_initial_to_lora(const torch::nn::Module& module, const std::string& adapter, model_state::StateDict& tensors,
                             const std::string& what) {
  for (const auto& entry : adapter_layers(module)) {
    if (!entry.layer->has_adapter(adapter)) continue;
    const auto* a = dynamic_cast<const LoRALinearAdapterImpl*>(entry.layer->adapter_module(adapter).get());
    if (a == nullptr || !init_changes_base(a->options().init())) continue;
    if (!a->initial_A.defined()) {
      throw PeftError(fmt::format("{}: convert_to_lora needs the factors adapter \"{}\" of '{}' had at "
                                  "initialisation, and they were not computed in this process (its factors and "
                                  "residual base came from a checkpoint); nothing was written. Save without "
                                  "convert_to_lora, or convert in the process that initialised the adapter",
                                  what, adapter, entry.name));
    }
    const std::string prefix = kPeftKeyPrefix + entry.name + ".";
    auto& A = tensors.at(prefix + "lora_A.weight");
    auto& B = tensors.at(prefix + "lora_B.weight");
    A = at::cat({A, a->initial_A.to(A.scalar_type())}, 0);
    B = at::cat({B, -a->initial_B.to(B.scalar_type())}, 1);
  }
}

}  // namespace

void save_adapter(const torch::nn::Module& module, const std::string& dir, const SaveAdapterOptions& options) {
  const std::string what = fmt::format("save_adapter('{}')", dir);
  const std::string adapter = resolve_adapter(module, options.adapter_name, what);
  std::string peft_type;
  for (const auto& entry : adapter_layers(module)) {
    if (!entry.layer->has_adapter(adapter)) continue;
    if (!peft_type.empty() && entry.layer->peft_type() != peft_type) {
      throw PeftError(fmt::format("{}: adapter \"{}\" spans {} and {} layers; one adapter file describes one method",
                                  what, adapter, peft_type, entry.layer->peft_type()));
    }
    peft_type = entry.layer->peft_type();
  }
  const auto& method = method_for_peft_type(peft_type, what);
  if (!method.write_hf_config) {
    throw PeftError(fmt::format("{}: the {} method has no adapter_config.json writer", what, peft_type));
  }
  const std::string config_text = method.write_hf_config(module, adapter, options);
  model_state::StateDict tensors = get_peft_model_state_dict(module, adapter, options.experts);
  if (options.convert_to_lora) convert_initial_to_lora(module, adapter, tensors, what);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    throw model_state::CheckpointError(fmt::format("{}: cannot create the adapter directory: {}", dir, ec.message()));
  }
  model_state::save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), tensors,
                                {{"format", "pt"}});
  model_state::write_file_atomically((fs::path(dir) / "adapter_config.json").string(), config_text);
}

}  // namespace d9d::peft::hf
