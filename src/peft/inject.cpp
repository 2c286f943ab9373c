// Adding a method's adapter to the layers its rule selects: planned in full
// before the first change, so an error leaves the model as it was.
#include <d9d/model_state/mapper/leaf/rename.h>
#include <d9d/nn/adaptable.h>
#include <d9d/peft/adapters.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/inject.h>
#include <d9d/peft/module_tree.h>

#include <torch/nn/module.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

namespace d9d::peft {

namespace {

std::string example_names(const std::vector<ModuleEntry>& modules, const AdapterTargeting& t) {
  std::vector<std::string> names;
  for (const auto& entry : modules) {
    if (t.adapts && t.adapts(*entry.module)) names.push_back("'" + entry.name + "'");
    if (names.size() == 5) break;
  }
  if (names.empty()) return "the model has no adaptable layer outside existing adapters";
  return fmt::format("adaptable layers here are named like {}", fmt::join(names, ", "));
}

/// Runs `build` (a layer's constructor or add_adapter, which know their
/// shapes but not their path) and names layer `name` in its error if the
/// message does not already.
template <typename F>
auto naming_layer(const std::string& name, F&& build) {
  try {
    return build();
  } catch (const PeftError& e) {
    const std::string what = e.what();
    if (what.find("'" + name + "'") != std::string::npos) throw;
    throw PeftError(fmt::format("{} (layer '{}')", what, name));
  }
}

/// One layer to adapt: a new adapter layer (not yet in the tree) or an existing one.
struct Plan {
  ModuleEntry entry;
  std::shared_ptr<torch::nn::Module> layer_module;
  AdapterLayer* layer = nullptr;
  bool fresh = true;
  std::shared_ptr<const AdapterOptions> options;
  torch::nn::AnyModule any;  // the new layer, typed for containers
};

}  // namespace

PeftInjectionResult inject_adapters(torch::nn::Module& module, const AdapterTargeting& t) {
  const std::string& adapter = t.adapter_name;
  validate_adapter_name(adapter);
  const auto active_now = active_adapters(module);
  const bool active = adapter_names(module).empty() ||
                      std::find(active_now.begin(), active_now.end(), adapter) != active_now.end();

  std::vector<Plan> plans;
  std::vector<std::string> matched;
  const auto modules = list_modules(module, /*enter_adapters=*/false);
  // Every layer's options first: a refusal while selecting comes before any
  // new layer is built (building one may already change its base: PiSSA and
  // OLoRA leave the residual there).
  std::vector<std::pair<const ModuleEntry*, std::shared_ptr<const AdapterOptions>>> selected;
  for (const auto& entry : modules) {
    if (auto options = t.select(entry.name)) {
      if (t.check) t.check(entry.name, *entry.module, *options);
      selected.emplace_back(&entry, std::move(options));
    }
  }
  // New layers built while planning, not yet in the tree: when planning fails
  // later they are unwrapped, which puts their bases back (a PiSSA or OLoRA
  // residual to float rounding).
  std::vector<std::shared_ptr<torch::nn::Module>> built;
  try {
    for (const auto& [entry_ptr, options] : selected) {
      const ModuleEntry& entry = *entry_ptr;
      matched.push_back("'" + entry.name + "'");
      Plan plan{entry, nullptr, dynamic_cast<AdapterLayer*>(entry.module.get()), true, options, {}};
      if (plan.layer) {
        if (plan.layer->peft_type() != t.peft_type) {
          throw PeftError(fmt::format("{}: '{}' is already a {} adapter layer; one layer holds one method's adapters. "
                                      "Narrow {} to exclude it",
                                      t.method, entry.name, plan.layer->peft_type(), t.what));
        }
        if (plan.layer->has_adapter(adapter)) {
          throw PeftError(fmt::format("{}: '{}' already holds an adapter \"{}\"; give the new adapter another name, or "
                                      "delete_adapter(\"{}\") first",
                                      t.method, entry.name, adapter, adapter));
        }
        plan.layer_module = entry.module;
        plan.fresh = false;
      } else {
        plan.any = naming_layer(entry.name, [&] { return t.wrap(entry.module, *plan.options, adapter); });
        if (plan.any.is_empty()) {
          if (!entry.module->children().empty()) continue;  // a container: its children are visited
          const bool torch_layer = entry.module->name().rfind("torch::nn::", 0) == 0;
          throw PeftError(fmt::format("{}: {} matches '{}' of type {}, which {} cannot adapt (it adapts {}). {}",
                                      t.method, t.what, entry.name, type_name(*entry.module), t.method, t.adaptable,
                                      torch_layer ? "Declare the layer as its d9d::nn drop-in (same options, keys and "
                                                    "numerics), or narrow the pattern to exclude it."
                                                  : "Narrow the pattern to exclude it."));
        }
        plan.layer_module = plan.any.ptr();
        plan.layer = dynamic_cast<AdapterLayer*>(plan.layer_module.get());
        if (!plan.layer) {
          throw PeftError(fmt::format("{}: the layer built for '{}' is no AdapterLayer", t.method, entry.name));
        }
        built.push_back(plan.layer_module);
        if (!dynamic_cast<d9d::nn::Adaptable*>(entry.module.get()) && !is_synced_container(*entry.parent)) {
          throw PeftError(fmt::format(
              "{}: cannot adapt '{}' ({}): its parent {} holds it as a typed member, and LibTorch's replace_module "
              "cannot redirect calls made through a member. Declare the layer as d9d::nn::Linear (the drop-in with the "
              "same options, keys and numerics), or narrow {} to exclude it.",
              t.method, entry.name, type_name(*entry.module), type_name(*entry.parent), t.what));
        }
      }
      if (!entry.aliases.empty()) {
        throw PeftError(fmt::format(
            "{}: {} selects '{}', which is also registered as '{}' (a shared or tied module). A wrapper at one path "
            "would leave the other path's keys and calls out of step; untie the module (give each path its own layer) "
            "or narrow {} to exclude it",
            t.method, t.what, entry.name, fmt::join(entry.aliases, "', '"), t.what));
      }
      plans.push_back(std::move(plan));
    }
  } catch (...) {
    for (auto it = built.rbegin(); it != built.rend(); ++it) {
      try {
        dynamic_cast<AdapterLayer&>(**it).unwrap();
      } catch (...) {
        // Only a base of factors loaded from a file cannot be restored, and
        // a layer built here holds none; the first error is the one to report.
      }
    }
    throw;
  }
  if (plans.empty()) {
    if (matched.empty()) {
      throw PeftError(
          fmt::format("{}: {} matches no module; {}, and {}", t.method, t.what, t.hint, example_names(modules, t)));
    }
    throw PeftError(fmt::format("{}: {} matches {} but none is a layer {} can adapt (it adapts {}); {}", t.method, t.what,
                                fmt::join(matched, ", "), t.method, t.adaptable, example_names(modules, t)));
  }

  PeftInjectionResult result;
  std::vector<std::string> now_active = active_now;
  if (active) now_active.push_back(adapter);
  for (auto& plan : plans) {
    const auto& name = plan.entry.name;
    if (plan.fresh) {
      // The base's own keys move under `base.`.
      for (const auto& p : plan.entry.module->named_parameters(/*recurse=*/false)) {
        result.load_state_mappers.push_back(
            std::make_shared<model_state::Rename>(name + "." + p.key(), name + ".base." + p.key()));
      }
      for (const auto& b : plan.entry.module->named_buffers(/*recurse=*/false)) {
        result.load_state_mappers.push_back(
            std::make_shared<model_state::Rename>(name + "." + b.key(), name + ".base." + b.key()));
      }
      replace_child(*plan.entry.parent, plan.entry.child_name, plan.any);
      if (auto* adaptable = dynamic_cast<d9d::nn::Adaptable*>(plan.entry.module.get())) {
        adaptable->set_override(std::dynamic_pointer_cast<d9d::nn::LayerOverride>(plan.layer_module));
      }
    } else {
      naming_layer(name, [&] { plan.layer->add_adapter(adapter, *plan.options); });
    }
    // A new layer or adapter starts in the mode of the layer it adapts
    // (LibTorch modules start in training mode): injecting into a model in
    // eval mode must not switch dropout on.
    plan.layer_module->train(plan.entry.module->is_training());
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
