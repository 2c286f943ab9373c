// Hotswapping LoRA adapters in place, and padding them to a rank bound first.
#include <d9d/peft/adapters.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hotswap.h>
#include <d9d/peft/lora/conv2d.h>
#include <d9d/peft/lora/embedding.h>
#include <d9d/peft/lora/grouped_linear.h>
#include <d9d/peft/lora/linear.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../non_finite.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <optional>
#include <set>

namespace d9d::peft {

namespace {

/// Zero-pads dimension `dim` of parameter `t` to `size`. The tensor object
/// keeps its identity (its data is replaced, as `param.data = padded`), so
/// every holder of it, the module's registry and an optimizer's list, sees
/// the padded tensor. A gradient of the old shape is dropped.
void pad_in_place(const at::Tensor& t, int64_t dim, int64_t size) {
  if (t.size(dim) == size) return;
  torch::NoGradGuard no_grad;
  std::vector<int64_t> shape = t.sizes().vec();
  shape[dim] = size;
  at::Tensor padded = at::zeros(shape, t.options());
  padded.narrow(dim, 0, t.size(dim)).copy_(t);
  t.set_data(padded);
  if (t.grad().defined()) t.mutable_grad() = at::Tensor();
}

/// The options of a LoRA adapter padded from its rank to `r`, with the alpha
/// that keeps its scale.
LoRAParameters padded_options(LoRAParameters options, double scale, int64_t r) {
  const double alpha = options.use_rslora() ? scale * std::sqrt(static_cast<double>(r)) : scale * static_cast<double>(r);
  return options.r(r).alpha(alpha);
}

}  // namespace

void LoRALinearAdapterImpl::pad_rank(int64_t r) {
  TORCH_CHECK(r >= options_.r(), "pad_rank: rank ", r, " is below the adapter's rank ", options_.r());
  pad_in_place(lora_A->weight, 0, r);
  pad_in_place(lora_B->weight, 1, r);
  lora_A->options.out_features(r);
  lora_B->options.in_features(r);
  options_ = padded_options(options_, scale_, r);
}

void LoRAEmbeddingAdapterImpl::pad_rank(int64_t r) {
  TORCH_CHECK(r >= options_.r(), "pad_rank: rank ", r, " is below the adapter's rank ", options_.r());
  pad_in_place(lora_embedding_A, 0, r);
  pad_in_place(lora_embedding_B, 1, r);
  options_ = padded_options(options_, scale_, r);
}

namespace {

/// One LoRA adapter of one layer, whatever the layer type: `A` is `[r, in]`
/// (`lora_A.weight` or `lora_embedding_A`), `B` `[out, r]`.
struct LoRAAdapterView {
  const AdapterLayerEntry* entry = nullptr;
  std::string a_key, b_key;  // relative to the layer, as in PEFT's files
  at::Tensor A, B, magnitude;
  const LoRAParameters* options = nullptr;
  double scale = 1.0;
  std::function<void(int64_t)> pad_rank;
  std::function<void()> reset_magnitude;  // DoRA: from the base weight and the current A, B
};

/// Adapter `name` of `entry` as LoRA, or nothing when the layer is no LoRA layer.
std::optional<LoRAAdapterView> lora_view(const AdapterLayerEntry& entry, const std::string& name) {
  LoRAAdapterView v;
  v.entry = &entry;
  if (auto* layer = dynamic_cast<LoRALinearImpl*>(entry.layer)) {
    auto adapter = layer->find(name);
    if (!adapter) return std::nullopt;
    v.a_key = "lora_A.weight";
    v.b_key = "lora_B.weight";
    v.A = adapter->lora_A->weight;
    v.B = adapter->lora_B->weight;
    v.magnitude = adapter->lora_magnitude_vector;
    v.options = &adapter->options();
    v.scale = adapter->scale();
    v.pad_rank = [adapter](int64_t r) { adapter->pad_rank(r); };
    v.reset_magnitude = [layer, name] { layer->reset_magnitude(name); };
    return v;
  }
  if (auto* layer = dynamic_cast<LoRAEmbeddingImpl*>(entry.layer)) {
    auto adapter = layer->find(name);
    if (!adapter) return std::nullopt;
    v.a_key = "lora_embedding_A";
    v.b_key = "lora_embedding_B";
    v.A = adapter->lora_embedding_A;
    v.B = adapter->lora_embedding_B;
    v.magnitude = adapter->lora_magnitude_vector;
    v.options = &adapter->options();
    v.scale = adapter->scale();
    v.pad_rank = [adapter](int64_t r) { adapter->pad_rank(r); };
    v.reset_magnitude = [layer, name] { layer->reset_magnitude(name); };
    return v;
  }
  return std::nullopt;
}

std::string shape_str(at::IntArrayRef sizes) { return fmt::format("[{}]", fmt::join(sizes, ", ")); }

/// At most `limit` names, then how many more.
std::string some(const std::vector<std::string>& names, size_t limit = 8) {
  if (names.size() <= limit) return fmt::format("{}", fmt::join(names, ", "));
  return fmt::format("{}, and {} more", fmt::join(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(limit), ", "),
                     names.size() - limit);
}

}  // namespace

void prepare_for_hotswap(torch::nn::Module& model, int64_t target_rank) {
  if (target_rank < 1) {
    throw PeftError(fmt::format("prepare_for_hotswap: target_rank must be >= 1, got {}", target_rank));
  }
  const auto layers = adapter_layers(model);
  std::vector<LoRAAdapterView> views;
  for (const auto& entry : layers) {
    for (const auto& name : entry.layer->adapter_names()) {
      auto v = lora_view(entry, name);
      if (!v && dynamic_cast<LoRAConv2dImpl*>(entry.layer)) {
        throw PeftError(fmt::format("prepare_for_hotswap: '{}' is a Conv2d LoRA layer holding adapter \"{}\"; "
                                    "hotswapping covers Linear and Embedding LoRA layers only, so nothing was padded. "
                                    "Load adapters with load_adapter and switch with set_adapter instead",
                                    entry.name, name));
      }
      if (!v && dynamic_cast<LoRAGroupedLayer*>(entry.layer)) {
        throw PeftError(fmt::format("prepare_for_hotswap: '{}' is a grouped expert layer (LoRAGroupedLinear) holding "
                                    "adapter \"{}\"; hotswapping covers Linear and Embedding LoRA layers only, so "
                                    "nothing was padded. Load expert adapters with load_adapter and switch with "
                                    "set_adapter instead",
                                    entry.name, name));
      }
      if (!v) continue;
      if (v->options->r() > target_rank) {
        throw PeftError(fmt::format("prepare_for_hotswap: adapter \"{}\" of '{}' has rank {}, above target_rank {}; "
                                    "nothing was padded. Pass a target_rank of at least the largest rank of the "
                                    "adapters you will load",
                                    name, entry.name, v->options->r(), target_rank));
      }
      views.push_back(std::move(*v));
    }
  }
  if (views.empty()) {
    throw PeftError("prepare_for_hotswap: the model holds no LoRA adapter; call it after loading the first "
                    "adapter (hf::load_adapter) and before hotswapping others into it");
  }
  for (const auto& v : views) v.pad_rank(target_rank);
}

namespace hf {

namespace {

/// What one layer of the adapter gets: the values to copy into its tensors,
/// or (no entry in the new adapter) zeros.
struct Planned {
  LoRAAdapterView view;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // target, value (already shaped, typed and placed)
};

void hotswap(torch::nn::Module& model, const AdapterTensors& tensors, const LoraConfig& config,
             const std::string& adapter_name, const std::string& what) {
  if (!config.target_parameters.empty()) {
    throw PeftError(fmt::format("{}: the config sets target_parameters (LoRA on grouped expert layers), which "
                                "hotswapping does not support; nothing was changed. Load it as another adapter "
                                "(load_adapter) and set_adapter",
                                what));
  }
  const auto layers = adapter_layers(model);
  const auto names = adapter_names(model);
  if (std::find(names.begin(), names.end(), adapter_name) == names.end()) {
    throw PeftError(fmt::format("{}: the model has no adapter \"{}\"; its adapters: {}. Hotswapping replaces the "
                                "weights of a loaded adapter: load the first one with load_adapter",
                                what, adapter_name, names.empty() ? "none" : fmt::format("\"{}\"", fmt::join(names, "\", \""))));
  }

  // The adapter's layers, as LoRA, with the config fields that must agree
  // (PEFT's check_hotswap_configs_compatible: use_dora, lora_dropout).
  std::vector<Planned> plan;
  std::map<std::string, std::pair<size_t, std::string>> expected;  // file key -> layer, relative key
  for (const auto& entry : layers) {
    if (!entry.layer->has_adapter(adapter_name)) continue;
    auto v = lora_view(entry, adapter_name);
    if (!v && dynamic_cast<LoRAConv2dImpl*>(entry.layer)) {
      throw PeftError(fmt::format("{}: '{}' is a Conv2d LoRA layer holding adapter \"{}\"; hotswapping covers Linear "
                                  "and Embedding LoRA layers only. Nothing was swapped; load the new adapter under "
                                  "another name (load_adapter) and switch with set_adapter",
                                  what, entry.name, adapter_name));
    }
    if (!v && dynamic_cast<LoRAGroupedLayer*>(entry.layer)) {
      throw PeftError(fmt::format("{}: '{}' is a grouped expert layer (LoRAGroupedLinear) holding adapter \"{}\"; "
                                  "hotswapping covers Linear and Embedding LoRA layers only. Nothing was swapped; load "
                                  "the new adapter under another name (load_adapter) and switch with set_adapter",
                                  what, entry.name, adapter_name));
    }
    if (!v) {
      throw PeftError(fmt::format("{}: '{}' holds adapter \"{}\" as a {} layer; hotswapping replaces LoRA adapters "
                                  "only (as PEFT's). Load the adapter as another one instead (load_adapter)",
                                  what, entry.name, adapter_name, entry.layer->peft_type()));
    }
    const auto merged = entry.layer->merged_adapters();
    if (std::find(merged.begin(), merged.end(), adapter_name) != merged.end()) {
      throw PeftError(fmt::format("{}: adapter \"{}\" is merged into '{}'; swapping merged weights would corrupt "
                                  "the base weight. Unmerge it first (unmerge_adapters)",
                                  what, adapter_name, entry.name));
    }
    if (v->options->use_dora() != config.use_dora) {
      throw PeftError(fmt::format("{}: use_dora is {} in the new adapter but {} in the loaded one ('{}'); LoRA and "
                                  "DoRA adapters cannot be hotswapped for each other (PEFT refuses too). Load it as "
                                  "another adapter (load_adapter)",
                                  what, config.use_dora, v->options->use_dora(), entry.name));
    }
    if (v->options->dropout() != config.lora_dropout) {
      throw PeftError(fmt::format("{}: lora_dropout is {} in the new adapter but {} in the loaded one ('{}'); "
                                  "hotswapping keeps the layer's dropout (PEFT refuses too). Load it as another "
                                  "adapter (load_adapter)",
                                  what, config.lora_dropout, v->options->dropout(), entry.name));
    }
    for (const auto& p : entry.layer->adapter_module(adapter_name)->named_parameters()) {
      expected.emplace(entry.name + "." + p.key(), std::make_pair(plan.size(), p.key()));
    }
    plan.push_back({std::move(*v), {}});
  }

  // The new adapter's tensors by layer; keys with no layer of the adapter
  // are an error (PEFT's "unexpected keys": hotswapping adds no layer).
  std::vector<std::map<std::string, std::pair<std::string, at::Tensor>>> given(plan.size());  // rel -> file key, tensor
  std::vector<std::string> unexpected;
  for (const auto& item : tensors) {
    const std::string& file_key = item.first;
    const std::string key =
        file_key.rfind(kPeftKeyPrefix, 0) == 0 ? file_key.substr(kPeftKeyPrefix.size()) : file_key;
    auto it = expected.find(key);
    if (it == expected.end()) {
      unexpected.push_back(file_key);
      continue;
    }
    given[it->second.first].emplace(it->second.second, std::make_pair(file_key, item.second));
  }
  if (tensors.empty()) throw PeftError(fmt::format("{}: the new adapter holds no weights", what));
  if (!unexpected.empty()) {
    throw PeftError(fmt::format("{}: the new adapter has weights for layers adapter \"{}\" does not adapt: {}. "
                                "Hotswapping cannot adapt new layers (PEFT cannot either); load it as another "
                                "adapter (load_adapter) or into a model that adapts them. Nothing was swapped",
                                what, adapter_name, some(unexpected)));
  }

  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < plan.size(); ++i) {
    Planned& p = plan[i];
    const LoRAAdapterView& v = p.view;
    const std::string& layer = v.entry->name;
    if (given[i].empty()) continue;  // zeroed below, as PEFT does
    std::vector<std::string> lacking;
    for (const auto& e : expected) {
      if (e.second.first == i && !given[i].count(e.second.second)) lacking.push_back(e.first);
    }
    if (!lacking.empty()) {
      throw PeftError(fmt::format("{}: the new adapter has some weights of '{}' but lacks {}; an adapter gives all of "
                                  "a layer's weights or none. Nothing was swapped",
                                  what, layer, fmt::join(lacking, ", ")));
    }
    const auto& [a_file, a] = given[i].at(v.a_key);
    const auto& [b_file, b] = given[i].at(v.b_key);
    for (const auto* t : {&given[i].at(v.a_key), &given[i].at(v.b_key)}) {
      if (t->second.dim() != 2) {
        throw PeftError(fmt::format("{}: {} has shape {}; a LoRA weight is 2-D", what, t->first,
                                    shape_str(t->second.sizes())));
      }
    }
    const int64_t r = a.size(0);
    const int64_t bound = v.A.size(0);
    if (a.size(1) != v.A.size(1) || b.size(0) != v.B.size(0) || b.size(1) != r) {
      throw PeftError(fmt::format("{}: the new adapter's {} {} and {} {} do not fit '{}' (its {} {}, {} {}: [r, {}] and "
                                  "[{}, r] with one r); wrong base model? Nothing was swapped",
                                  what, a_file, shape_str(a.sizes()), b_file, shape_str(b.sizes()), layer, v.a_key,
                                  shape_str(v.A.sizes()), v.b_key, shape_str(v.B.sizes()), v.A.size(1), v.B.size(0)));
    }
    const auto options = config.select(layer);
    if (!options) {
      throw PeftError(fmt::format("{}: the new adapter has weights for '{}' ({}) but its config does not target it "
                                  "(target_modules {}); the weights and the config disagree",
                                  what, layer, a_file, config.target_modules.describe()));
    }
    if (options->r() != r) {
      throw PeftError(fmt::format("{}: {} has rank {} but the new adapter's config gives '{}' r = {} (r, "
                                  "rank_pattern); the weights and the config disagree",
                                  what, a_file, r, layer, options->r()));
    }
    if (r > bound) {
      int64_t largest = r;
      for (size_t j = 0; j < plan.size(); ++j) {
        if (given[j].count(plan[j].view.a_key) && given[j].at(plan[j].view.a_key).second.dim() == 2) {
          largest = std::max(largest, given[j].at(plan[j].view.a_key).second.size(0));
        }
      }
      throw PeftError(fmt::format("{}: the new adapter has rank {} at '{}', above the rank {} adapter \"{}\"'s tensors "
                                  "hold there; hotswapping keeps the tensors, so their rank is the bound. Call "
                                  "prepare_for_hotswap(model, {}) (or larger) after loading the first adapter, before "
                                  "building the optimizer or capturing a graph. Nothing was swapped",
                                  what, r, layer, bound, adapter_name, largest));
    }
    for (const auto& g : given[i]) {
      const int64_t bad = detail::count_non_finite(g.second.second);
      if (bad != 0) {
        throw PeftError(fmt::format("{}: {} holds {} NaN or Inf value{} (of {}); fix or retrain the adapter. Nothing "
                                    "was swapped",
                                    what, g.second.first, bad, bad == 1 ? "" : "s", g.second.second.numel()));
      }
    }
    // The layer keeps its scale (a number a captured graph holds): the new
    // scale's ratio to it goes into lora_B, rounded once.
    const double ratio = options->scale() / v.scale;
    at::Tensor new_a = at::zeros_like(v.A);
    new_a.narrow(0, 0, r).copy_(a);
    at::Tensor new_b = at::zeros_like(v.B);
    new_b.narrow(1, 0, r).copy_(ratio == 1.0 ? b : b.to(at::kDouble) * ratio);
    const int64_t overflow = detail::count_non_finite(new_b);
    if (overflow != 0) {
      throw PeftError(fmt::format("{}: {} times {} (the new scale {} over the layer's {}) overflows {} in {} value{}; "
                                  "keep the adapters' scales closer or the adapter in float32 (cast_adapter_dtype). "
                                  "Nothing was swapped",
                                  what, b_file, ratio, options->scale(), v.scale, c10::toString(v.B.scalar_type()),
                                  overflow, overflow == 1 ? "" : "s"));
    }
    p.copies.emplace_back(v.A, new_a);
    p.copies.emplace_back(v.B, new_b);
    if (v.magnitude.defined()) {
      const auto& [m_file, m] = given[i].at("lora_magnitude_vector");
      if (m.sizes() != v.magnitude.sizes()) {
        throw PeftError(fmt::format("{}: {} has shape {}, '{}' holds {}; wrong base model? Nothing was swapped", what,
                                    m_file, shape_str(m.sizes()), layer, shape_str(v.magnitude.sizes())));
      }
      p.copies.emplace_back(v.magnitude, m.to(v.magnitude.options()));
    }
  }

  // Everything checked: write. Tensors keep their identity (copy_ in place).
  for (auto& p : plan) {
    if (p.copies.empty()) {
      // A layer the new adapter leaves out computes its base: B A = 0, and
      // DoRA's magnitude the base weight's norm (PEFT zeroes the magnitude
      // too, which would scale the layer's output to zero).
      p.view.A.zero_();
      p.view.B.zero_();
      if (p.view.magnitude.defined()) p.view.reset_magnitude();
      continue;
    }
    for (auto& c : p.copies) c.first.copy_(c.second);
  }
}

}  // namespace

void hotswap_adapter_from_state_dict(torch::nn::Module& model, const AdapterTensors& tensors,
                                     const LoraConfig& config, const std::string& adapter_name,
                                     const std::string& source) {
  validate(config, source);
  hotswap(model, tensors, config, adapter_name,
          fmt::format("hotswap_adapter_from_state_dict({} into adapter \"{}\")", source, adapter_name));
}

void hotswap_adapter(torch::nn::Module& model, const std::string& adapter_dir, const std::string& adapter_name) {
  const std::string what = fmt::format("hotswap_adapter('{}' into adapter \"{}\")", adapter_dir, adapter_name);
  const AdapterFiles files = read_adapter_files(adapter_dir);
  if (files.peft_type != "LORA") {
    throw PeftError(fmt::format("{}: {} says peft_type {}; hotswapping replaces LoRA adapters only (as PEFT's). "
                                "Load it as another adapter instead (load_adapter)",
                                what, files.config_path, files.peft_type));
  }
  hotswap(model, files.tensors, parse_lora_config(files.config, files.config_path), adapter_name, what);
}

}  // namespace hf

}  // namespace d9d::peft
