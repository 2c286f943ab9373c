// add_weighted_adapter in a model: every check first, then the new adapter
// is added to the layers that hold an input and given the combined factors.
#include <d9d/peft/adapters.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/conv2d.h>
#include <d9d/peft/lora/embedding.h>
#include <d9d/peft/lora/grouped_linear.h>
#include <d9d/peft/lora/linear.h>
#include <d9d/peft/lora/weighted.h>

#include <torch/csrc/autograd/grad_mode.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../rollback.h"

#include <algorithm>
#include <cmath>

namespace d9d::peft {

namespace {

/// One input adapter on one layer, as the combination reads it.
struct LayerInput {
  const LoRAParameters* options = nullptr;
  at::Tensor a, b;
  double scale = 1.0;
};

/// Adapter `name` of `entry` as a LoRA input; `PeftError` where it cannot be combined.
LayerInput read_input(const AdapterLayerEntry& entry, const std::string& name, const std::string& what) {
  const auto module = entry.layer->adapter_module(name);
  LayerInput in;
  std::string a_key, b_key;
  if (const auto* l = dynamic_cast<const LoRALinearAdapterImpl*>(module.get())) {
    in = {&l->options(), l->lora_A->weight, l->lora_B->weight, l->scale()};
    a_key = "lora_A.weight";
    b_key = "lora_B.weight";
  } else if (const auto* e = dynamic_cast<const LoRAEmbeddingAdapterImpl*>(module.get())) {
    in = {&e->options(), e->lora_embedding_A, e->lora_embedding_B, e->scale()};
    a_key = "lora_embedding_A";
    b_key = "lora_embedding_B";
  } else if (dynamic_cast<const LoRAConv2dAdapterImpl*>(module.get())) {
    throw PeftError(fmt::format("{}: adapter \"{}\" on '{}' adapts a Conv2d layer; weighted combinations are built for "
                                "Linear and Embedding LoRA layers only. Combine adapters that leave the conv layers "
                                "out, or merge each adapter in turn",
                                what, name, entry.name));
  } else if (dynamic_cast<const LoRAGroupedLinearAdapterImpl*>(module.get())) {
    throw PeftError(fmt::format("{}: adapter \"{}\" on '{}' adapts grouped expert weights (LoRAGroupedLinear); "
                                "weighted combinations are built for Linear and Embedding LoRA layers only. Combine "
                                "adapters that leave the experts out, or merge each expert adapter in turn",
                                what, name, entry.name));
  } else {
    throw PeftError(fmt::format("{}: adapter \"{}\" on '{}' is a {} adapter; only LoRA adapters combine", what, name,
                                entry.name, entry.layer->peft_type()));
  }
  if (in.options->use_dora()) {
    throw PeftError(fmt::format("{}: adapter \"{}\" on '{}' uses DoRA; a weighted combination keeps only B @ A and "
                                "would drop its magnitude (PEFT does so silently), so combine plain LoRA adapters",
                                what, name, entry.name));
  }
  for (const auto& [key, t] : {std::make_pair(a_key, in.a), std::make_pair(b_key, in.b)}) {
    if (!at::isfinite(t).all().item<bool>()) {
      throw PeftError(fmt::format("{}: adapter \"{}\" holds NaN or Inf in '{}.{}'; fix or retrain that adapter",
                                  what, name, entry.name, key));
    }
  }
  return in;
}

}  // namespace

void add_weighted_adapter(torch::nn::Module& model, const std::vector<std::string>& adapters,
                          const std::vector<double>& weights, const std::string& adapter_name,
                          const WeightedAdapterOptions& options) {
  const std::string what = fmt::format("add_weighted_adapter(\"{}\")", adapter_name);
  validate_adapter_name(adapter_name);
  const auto known = adapter_names(model);
  auto listed = [&] { return known.empty() ? std::string("none") : fmt::format("\"{}\"", fmt::join(known, "\", \"")); };
  if (std::find(known.begin(), known.end(), adapter_name) != known.end()) {
    throw PeftError(fmt::format("{}: the model already holds an adapter \"{}\"; pass another name, or "
                                "delete_adapter(\"{}\") first",
                                what, adapter_name, adapter_name));
  }
  if (adapters.empty()) throw PeftError(what + ": no adapters to combine; name at least one");
  for (const auto& a : adapters) {
    if (std::find(known.begin(), known.end(), a) == known.end()) {
      throw PeftError(fmt::format("{}: the model has no adapter \"{}\"; its adapters: {}", what, a, listed()));
    }
  }
  if (weights.size() != adapters.size()) {
    throw PeftError(fmt::format("{}: {} weights for {} adapters ({}); give one weight per adapter", what,
                                weights.size(), adapters.size(), fmt::join(adapters, ", ")));
  }
  for (size_t i = 0; i < weights.size(); ++i) {
    if (!std::isfinite(weights[i])) {
      throw PeftError(fmt::format("{}: the weight of adapter \"{}\" is {}; weights must be finite", what, adapters[i],
                                  weights[i]));
    }
  }
  options.validate(adapters.size());

  // Read every input, and each adapter's rank (its largest, as PEFT's config rank).
  const auto layers = adapter_layers(model);
  std::vector<int64_t> ranks(adapters.size(), 0);
  const LoRAParameters* first = nullptr;
  std::vector<std::vector<lora::WeightedInput>> inputs(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    for (size_t i = 0; i < adapters.size(); ++i) {
      if (!layers[l].layer->has_adapter(adapters[i])) continue;
      const LayerInput in = read_input(layers[l], adapters[i], what);
      if (i == 0 && !first) first = in.options;
      ranks[i] = std::max(ranks[i], in.a.size(0));
      inputs[l].push_back({in.a.detach(), in.b.detach(), in.scale, weights[i]});
    }
  }
  const lora::WeightedPlan plan = lora::plan_weighted(adapters, ranks, options, what);

  // Every layer's factors before anything changes: an error leaves the model as it was.
  std::vector<std::pair<at::Tensor, at::Tensor>> combined(layers.size());
  {
    torch::NoGradGuard no_grad;
    for (size_t l = 0; l < layers.size(); ++l) {
      if (inputs[l].empty()) continue;
      const auto kind = layers[l].module->as<LoRAEmbeddingImpl>() ? lora::LayerKind::Embedding : lora::LayerKind::Linear;
      combined[l] =
          lora::combine_weighted(inputs[l], plan, options, fmt::format("{}: '{}'", what, layers[l].name), kind);
    }
  }

  InjectionSnapshot snapshot(model);
  try {
    torch::NoGradGuard no_grad;
    for (size_t l = 0; l < layers.size(); ++l) {
      if (inputs[l].empty()) continue;
      const at::Tensor& a = combined[l].first;
      const at::Tensor& b = combined[l].second;
      // alpha = r: the combination is computed for a scale of 1 (sqrt(r) with rsLoRA, as PEFT).
      const auto params = LoRAParameters()
                              .r(a.size(0))
                              .alpha(static_cast<double>(a.size(0)))
                              .dropout(first->dropout())
                              .use_rslora(first->use_rslora());
      layers[l].layer->add_adapter(adapter_name, params);
      const auto module = layers[l].layer->adapter_module(adapter_name);
      if (auto* lin = dynamic_cast<LoRALinearAdapterImpl*>(module.get())) {
        lin->lora_A->weight.copy_(a);
        lin->lora_B->weight.copy_(b);
      } else if (auto* emb = dynamic_cast<LoRAEmbeddingAdapterImpl*>(module.get())) {
        emb->lora_embedding_A.copy_(a);
        emb->lora_embedding_B.copy_(b);
      }
    }
  } catch (...) {
    snapshot.restore();
    throw;
  }
}

}  // namespace d9d::peft
