// LoRA's part of injection: which layers it wraps, and how.
#include <d9d/peft/errors.h>
#include <d9d/peft/inject.h>
#include <d9d/peft/lora/grouped_linear.h>
#include <d9d/peft/lora/layer.h>
#include <d9d/peft/lora/method.h>

#include <torch/nn/module.h>

#include <fmt/format.h>

#include <optional>

namespace d9d::peft {

namespace {

bool is_grouped(const torch::nn::Module& m) {
  return m.as<d9d::nn::GroupedLinearImpl>() != nullptr || m.as<LoRAGroupedLinearImpl>() != nullptr;
}

}  // namespace

PeftInjectionResult inject_lora(torch::nn::Module& module, const LoRATargeting& targeting) {
  AdapterTargeting t;
  t.method = "LoRA";
  t.peft_type = "LORA";
  t.adapter_name = targeting.adapter_name;
  t.what = targeting.what;
  t.hint = targeting.hint;
  t.adaptable =
      "d9d::nn::Linear, d9d::nn::Embedding, d9d::nn::GroupedLinear, d9d::nn::Conv2d, and torch::nn::Linear inside "
      "Sequential, ModuleList or ModuleDict";
  t.adapts = [](const torch::nn::Module& m) {
    return m.as<d9d::nn::LinearImpl>() || m.as<d9d::nn::EmbeddingImpl>() || m.as<d9d::nn::GroupedLinearImpl>() ||
           m.as<d9d::nn::Conv2dImpl>() || m.as<torch::nn::LinearImpl>();
  };
  // DoRA has no grouped form: refused while selecting, before anything
  // changes, naming the layer (the module tree is read only then).
  auto modules = std::make_shared<std::optional<torch::OrderedDict<std::string, std::shared_ptr<torch::nn::Module>>>>();
  t.select = [&targeting, &module, modules](const std::string& name) -> std::shared_ptr<const AdapterOptions> {
    auto options = targeting.select(name);
    if (!options) return nullptr;
    options->validate();
    if (!*modules) *modules = module.named_modules();
    const auto* found = (*modules)->find(name);
    if (options->use_dora() && found && is_grouped(**found)) refuse_grouped_dora(name);
    // A Conv2d LoRA cannot adapt: refused here, naming the layer, before anything changes.
    if (const auto* conv = found ? (*found)->as<d9d::nn::Conv2dImpl>() : nullptr) {
      if (auto why = lora_conv2d_refusal(name, conv->options); !why.empty()) throw PeftError(why);
    }
    // PiSSA and OLoRA factor a Linear weight matrix: refused here for the other
    // layer types, also when the layer already holds adapters (whose add_adapter
    // would refuse only once other layers were changed).
    if (found && (options->init() == LoRAInit::PiSSA || options->init() == LoRAInit::OLoRA)) {
      const torch::nn::Module& m = **found;
      if (is_grouped(m) || m.as<d9d::nn::Conv2dImpl>() || m.as<LoRAConv2dImpl>() || m.as<d9d::nn::EmbeddingImpl>() ||
          m.as<LoRAEmbeddingImpl>()) {
        throw PeftError(fmt::format("LoRA: '{}' is a {}; the {} initialisation is for Linear layers (it factors a "
                                    "Linear weight matrix, as in PEFT). Exclude the layer from the pattern, or use "
                                    "another initialisation",
                                    name, m.name(), lora_init_name(*options)));
      }
    }
    return std::make_shared<const LoRAParameters>(*options);
  };
  t.wrap = [](const std::shared_ptr<torch::nn::Module>& m, const AdapterOptions& o,
              const std::string& name) -> torch::nn::AnyModule {
    const auto& options = static_cast<const LoRAParameters&>(o);
    if (auto linear = std::dynamic_pointer_cast<d9d::nn::LinearImpl>(m)) {
      return torch::nn::AnyModule(std::make_shared<LoRALinearImpl>(linear, options, name));
    }
    if (auto embedding = std::dynamic_pointer_cast<d9d::nn::EmbeddingImpl>(m)) {
      return torch::nn::AnyModule(std::make_shared<LoRAEmbeddingImpl>(embedding, options, name));
    }
    if (auto grouped = std::dynamic_pointer_cast<d9d::nn::GroupedLinearImpl>(m)) {
      return torch::nn::AnyModule(std::make_shared<LoRAGroupedLinearImpl>(grouped, options, name));
    }
    if (auto conv = std::dynamic_pointer_cast<d9d::nn::Conv2dImpl>(m)) {
      return torch::nn::AnyModule(std::make_shared<LoRAConv2dImpl>(conv, options, name));
    }
    if (auto plain = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)) {
      return torch::nn::AnyModule(std::make_shared<LoRALinearImpl>(plain, options, name));
    }
    return {};
  };
  return inject_adapters(module, t);
}

}  // namespace d9d::peft
