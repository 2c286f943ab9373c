// Adding a LoRA adapter to the layers a targeting rule selects.
#include <d9d/model_state/mapper/leaf/rename.h>
#include <d9d/peft/adapters.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/layer.h>
#include <d9d/peft/lora/method.h>
#include <d9d/peft/module_tree.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

namespace d9d::peft {

namespace {

std::string example_names(const std::vector<ModuleEntry>& modules) {
  std::vector<std::string> names;
  for (const auto& entry : modules) {
    if (entry.module->as<d9d::nn::LinearImpl>() || entry.module->as<torch::nn::LinearImpl>() ||
        entry.module->as<d9d::nn::EmbeddingImpl>()) {
      names.push_back("'" + entry.name + "'");
    }
    if (names.size() == 5) break;
  }
  if (names.empty()) return "the model has no adaptable layer outside existing adapters";
  return fmt::format("adaptable layers here are named like {}", fmt::join(names, ", "));
}

/// One layer to adapt: a new wrapper (not yet in the tree) or an existing LoRA layer.
struct Plan {
  ModuleEntry entry;
  std::shared_ptr<torch::nn::Module> wrapper;
  AdapterLayer* layer = nullptr;
  bool fresh = true;
  LoRAParameters options;
  torch::nn::AnyModule any;
  d9d::nn::Adaptable* redirect = nullptr;
  std::shared_ptr<d9d::nn::LayerOverride> target;
  bool has_bias = false;
};

template <typename Wrapper>
Plan plan_new(const ModuleEntry& entry, const std::shared_ptr<Wrapper>& wrapper, d9d::nn::Adaptable* redirect,
              bool has_bias, const LoRAParameters& options) {
  Plan p;
  p.entry = entry;
  p.wrapper = wrapper;
  p.layer = wrapper.get();
  p.options = options;
  p.any = torch::nn::AnyModule(wrapper);
  p.redirect = redirect;
  if (redirect) p.target = wrapper;
  p.has_bias = has_bias;
  return p;
}

}  // namespace

PeftInjectionResult inject_lora(torch::nn::Module& module, const LoRATargeting& targeting) {
  const std::string& adapter = targeting.adapter_name;
  validate_adapter_name(adapter);
  const auto existing = adapter_names(module);
  const auto active_now = active_adapters(module);
  const bool active =
      existing.empty() || std::find(active_now.begin(), active_now.end(), adapter) != active_now.end();

  std::vector<Plan> plans;
  std::vector<std::string> matched;
  const auto modules = list_modules(module, /*enter_adapters=*/false);

  // Plan and build every new wrapper first: a failure leaves the model untouched.
  for (const auto& entry : modules) {
    const auto options = targeting.select(entry.name);
    if (!options) continue;
    matched.push_back("'" + entry.name + "'");
    auto* layer = dynamic_cast<AdapterLayer*>(entry.module.get());
    const bool adaptable = layer || entry.module->as<d9d::nn::LinearImpl>() || entry.module->as<d9d::nn::EmbeddingImpl>() ||
                           entry.module->as<torch::nn::LinearImpl>();
    if (adaptable && !entry.aliases.empty()) {
      throw PeftError(fmt::format(
          "LoRA: {} selects '{}', which is also registered as '{}' (a shared or tied module). A wrapper at one "
          "path would leave the other path's keys and calls out of step; untie the module (give each path its "
          "own layer) or narrow {} to exclude it",
          targeting.what, entry.name, fmt::join(entry.aliases, "', '"), targeting.what));
    }
    if (layer) {
      if (layer->peft_type() != "LORA") {
        throw PeftError(fmt::format("LoRA: '{}' is already a {} adapter layer; LoRA does not add adapters to "
                                    "another method's layer. Narrow {} to exclude it",
                                    entry.name, layer->peft_type(), targeting.what));
      }
      if (layer->has_adapter(adapter)) {
        throw PeftError(fmt::format("LoRA: '{}' already holds an adapter \"{}\"; give the new adapter another "
                                    "name, or delete_adapter(\"{}\") first",
                                    entry.name, adapter, adapter));
      }
      options->validate();
      Plan p;
      p.entry = entry;
      p.wrapper = entry.module;
      p.layer = layer;
      p.fresh = false;
      p.options = *options;
      plans.push_back(std::move(p));
    } else if (auto linear = std::dynamic_pointer_cast<d9d::nn::LinearImpl>(entry.module)) {
      plans.push_back(plan_new(entry, std::make_shared<LoRALinearImpl>(linear, *options, adapter), linear.get(),
                               linear->bias.defined(), *options));
    } else if (auto embedding = std::dynamic_pointer_cast<d9d::nn::EmbeddingImpl>(entry.module)) {
      plans.push_back(
          plan_new(entry, std::make_shared<LoRAEmbeddingImpl>(embedding, *options, adapter), embedding.get(), false,
                   *options));
    } else if (auto plain = std::dynamic_pointer_cast<torch::nn::LinearImpl>(entry.module)) {
      if (!is_synced_container(*entry.parent)) {
        throw PeftError(fmt::format(
            "LoRA: cannot adapt '{}' (torch::nn::LinearImpl): its parent {} holds it as a typed member, and "
            "LibTorch's replace_module cannot redirect calls made through a member. Declare the layer as "
            "d9d::nn::Linear (same options, keys and numerics), or narrow {} to exclude it.",
            entry.name, type_name(*entry.parent), targeting.what));
      }
      plans.push_back(plan_new(entry, std::make_shared<LoRALinearImpl>(plain, *options, adapter), nullptr,
                               plain->bias.defined(), *options));
    } else if (entry.module->children().empty()) {
      const bool torch_embedding = entry.module->name() == "torch::nn::EmbeddingImpl";
      throw PeftError(fmt::format(
          "LoRA: {} matches '{}' of type {}, which LoRA cannot adapt (it adapts d9d::nn::Linear, "
          "d9d::nn::Embedding, and torch::nn::Linear inside Sequential, ModuleList or ModuleDict). {}",
          targeting.what, entry.name, type_name(*entry.module),
          torch_embedding ? "Declare the layer as d9d::nn::Embedding (same options, keys and numerics)."
                          : "Narrow the pattern to exclude it."));
    }
  }
  if (plans.empty()) {
    if (matched.empty()) {
      throw PeftError(fmt::format("LoRA: {} matches no module; {}, and {}", targeting.what, targeting.hint,
                                  example_names(modules)));
    }
    throw PeftError(fmt::format("LoRA: {} matches {} but none is a layer LoRA can adapt; {}", targeting.what,
                                fmt::join(matched, ", "), example_names(modules)));
  }

  PeftInjectionResult result;
  std::vector<std::string> now_active = active_now;
  if (active) now_active.push_back(adapter);
  for (auto& plan : plans) {
    const auto& name = plan.entry.name;
    if (plan.fresh) {
      result.load_state_mappers.push_back(
          std::make_shared<model_state::Rename>(name + ".weight", name + ".base.weight"));
      if (plan.has_bias) {
        result.load_state_mappers.push_back(std::make_shared<model_state::Rename>(name + ".bias", name + ".base.bias"));
      }
      replace_child(*plan.entry.parent, plan.entry.child_name, plan.any);
      if (plan.redirect) plan.redirect->set_override(plan.target);
    } else {
      plan.layer->add_adapter(adapter, plan.options);
    }
    // A new wrapper or adapter starts in the mode of the layer it adapts
    // (LibTorch modules start in training mode): injecting into a model in
    // eval mode must not switch dropout on.
    plan.wrapper->train(plan.entry.module->is_training());
    // The layer's active set is the model's (plus this adapter when it is
    // active), restricted to what the layer holds.
    plan.layer->set_active_adapters(now_active);
    if (active) {
      for (const auto& p : plan.layer->adapter_module(adapter)->parameters()) result.parameters_to_train.push_back(p);
    }
  }
  return result;
}

}  // namespace d9d::peft
