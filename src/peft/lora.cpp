#include <d9d/model_state/mapper/leaf/rename.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/layer.h>
#include <d9d/peft/lora/method.h>
#include <d9d/peft/module_tree.h>

#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/linear.h>

#include <fmt/format.h>

namespace d9d::peft {

// ------------------------------------------------------------------ layer

LoRALinearImpl::LoRALinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoRAParameters& params)
    : d9d_base(std::move(base)), params_(params), scale_(static_cast<double>(params.alpha) / params.r) {
  TORCH_CHECK(d9d_base, "LoRALinearImpl: the base layer is null");
  register_module("base", d9d_base);
  build(d9d_base->weight.size(1), d9d_base->weight.size(0));
}

LoRALinearImpl::LoRALinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoRAParameters& params)
    : torch_base(std::move(base)), params_(params), scale_(static_cast<double>(params.alpha) / params.r) {
  TORCH_CHECK(torch_base, "LoRALinearImpl: the base layer is null");
  register_module("base", torch_base);
  build(torch_base->weight.size(1), torch_base->weight.size(0));
}

void LoRALinearImpl::build(int64_t in_features, int64_t out_features) {
  validate(LoRAConfig{".*", params_});
  const auto& weight = base_weight();
  lora_A = register_module("lora_A", torch::nn::Linear(torch::nn::LinearOptions(in_features, params_.r).bias(false)));
  lora_B = register_module("lora_B", torch::nn::Linear(torch::nn::LinearOptions(params_.r, out_features).bias(false)));
  dropout = register_module("dropout", torch::nn::Dropout(params_.dropout));
  lora_A->to(weight.device(), weight.scalar_type());
  lora_B->to(weight.device(), weight.scalar_type());
  torch::NoGradGuard no_grad;
  lora_B->weight.zero_();
}

void LoRALinearImpl::reset_parameters() {
  lora_A->reset_parameters();
  torch::NoGradGuard no_grad;
  lora_B->weight.zero_();
}

const at::Tensor& LoRALinearImpl::base_weight() const { return d9d_base ? d9d_base->weight : torch_base->weight; }

const at::Tensor& LoRALinearImpl::base_bias() const { return d9d_base ? d9d_base->bias : torch_base->bias; }

std::shared_ptr<torch::nn::Module> LoRALinearImpl::base() const {
  if (d9d_base) return d9d_base;
  return torch_base;
}

at::Tensor LoRALinearImpl::forward(const at::Tensor& input) {
  at::Tensor out = torch::nn::functional::linear(input, base_weight(), base_bias());
  const at::Tensor& h = (params_.dropout > 0.0 && is_training()) ? dropout->forward(input) : input;
  return out.add(lora_B->forward(lora_A->forward(h)), scale_);
}

void LoRALinearImpl::merge_into_base() {
  torch::NoGradGuard no_grad;
  base_weight().addmm_(lora_B->weight, lora_A->weight, /*beta=*/1.0, /*alpha=*/scale_);
}

void LoRALinearImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoRALinear(r=" << params_.r << ", alpha=" << params_.alpha << ", dropout=" << params_.dropout
         << ")";
}

// ----------------------------------------------------------------- method

namespace {

std::string example_linear_names(torch::nn::Module& module) {
  std::vector<std::string> names;
  for (const auto& entry : list_modules(module, /*enter_adapters=*/false)) {
    if (entry.module->as<d9d::nn::LinearImpl>() || entry.module->as<torch::nn::LinearImpl>()) {
      names.push_back("'" + entry.name + "'");
    }
    if (names.size() == 5) break;
  }
  if (names.empty()) return "the model has no linear layer outside existing adapters";
  return fmt::format("linear layers here are named like {}", fmt::join(names, ", "));
}

}  // namespace

LoRA::LoRA(LoRAConfig config) : PeftMethod(std::move(config)) {
  validate(config_);
  pattern_ = std::regex(config_.module_name_pattern, std::regex::ECMAScript);
}

PeftInjectionResult LoRA::inject(torch::nn::Module& module) {
  struct Plan {
    ModuleEntry entry;
    std::shared_ptr<LoRALinearImpl> wrapper;
  };
  std::vector<Plan> plans;
  std::vector<std::string> matched;
  const std::string& pattern = config_.module_name_pattern;

  // Plan and build every wrapper first: a failure leaves the model untouched.
  for (auto& entry : list_modules(module, /*enter_adapters=*/false)) {
    if (!std::regex_match(entry.name, pattern_)) continue;
    matched.push_back("'" + entry.name + "'");
    if (auto linear = std::dynamic_pointer_cast<d9d::nn::LinearImpl>(entry.module)) {
      plans.push_back({entry, std::make_shared<LoRALinearImpl>(linear, config_.params)});
    } else if (auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(entry.module)) {
      if (!is_synced_container(*entry.parent)) {
        throw PeftError(fmt::format(
            "LoRA: cannot adapt '{}' (torch::nn::LinearImpl): its parent {} holds it as a typed member, and "
            "LibTorch's replace_module cannot redirect calls made through a member. Declare the layer as "
            "d9d::nn::Linear (same options, keys and numerics), or narrow module_name_pattern \"{}\" to exclude it.",
            entry.name, type_name(*entry.parent), pattern));
      }
      plans.push_back({entry, std::make_shared<LoRALinearImpl>(linear, config_.params)});
    } else if (entry.module->children().empty()) {
      throw PeftError(fmt::format(
          "LoRA: module_name_pattern \"{}\" matches '{}' of type {}, which LoRA cannot adapt (it adapts "
          "d9d::nn::Linear, and torch::nn::Linear inside Sequential, ModuleList or ModuleDict). Narrow the "
          "pattern to exclude it.",
          pattern, entry.name, type_name(*entry.module)));
    }
  }
  if (plans.empty()) {
    if (matched.empty()) {
      throw PeftError(fmt::format("LoRA: module_name_pattern \"{}\" matches no module; it must match the whole "
                                  "qualified name, and {}",
                                  pattern, example_linear_names(module)));
    }
    throw PeftError(fmt::format("LoRA: module_name_pattern \"{}\" matches {} but none is a linear layer LoRA can "
                                "adapt; {}",
                                pattern, fmt::join(matched, ", "), example_linear_names(module)));
  }

  PeftInjectionResult result;
  for (auto& plan : plans) {
    const auto& name = plan.entry.name;
    const auto& wrapper = plan.wrapper;
    result.parameters_to_train.push_back(wrapper->lora_A->weight);
    result.parameters_to_train.push_back(wrapper->lora_B->weight);
    result.load_state_mappers.push_back(std::make_shared<model_state::Rename>(name + ".weight", name + ".base.weight"));
    if (wrapper->base_bias().defined()) {
      result.load_state_mappers.push_back(std::make_shared<model_state::Rename>(name + ".bias", name + ".base.bias"));
    }
    replace_child(*plan.entry.parent, plan.entry.child_name, torch::nn::AnyModule(wrapper));
    if (wrapper->d9d_base) wrapper->d9d_base->set_override(wrapper);
  }
  return result;
}

void LoRA::merge(torch::nn::Module& module) {
  for (auto& entry : list_modules(module)) {
    auto wrapper = std::dynamic_pointer_cast<LoRALinearImpl>(entry.module);
    if (!wrapper || !std::regex_match(entry.name, pattern_)) continue;
    wrapper->merge_into_base();
    if (wrapper->d9d_base) {
      wrapper->d9d_base->clear_override();
      replace_child(*entry.parent, entry.child_name, torch::nn::AnyModule(wrapper->d9d_base));
    } else {
      replace_child(*entry.parent, entry.child_name, torch::nn::AnyModule(wrapper->torch_base));
    }
  }
}

}  // namespace d9d::peft
