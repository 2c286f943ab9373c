// LoRA's part of injection: which layers it wraps, and how.
#include <d9d/peft/inject.h>
#include <d9d/peft/lora/layer.h>
#include <d9d/peft/lora/method.h>

namespace d9d::peft {

PeftInjectionResult inject_lora(torch::nn::Module& module, const LoRATargeting& targeting) {
  AdapterTargeting t;
  t.method = "LoRA";
  t.peft_type = "LORA";
  t.adapter_name = targeting.adapter_name;
  t.what = targeting.what;
  t.hint = targeting.hint;
  t.adaptable = "d9d::nn::Linear, d9d::nn::Embedding, and torch::nn::Linear inside Sequential, ModuleList or ModuleDict";
  t.adapts = [](const torch::nn::Module& m) {
    return m.as<d9d::nn::LinearImpl>() || m.as<d9d::nn::EmbeddingImpl>() || m.as<torch::nn::LinearImpl>();
  };
  t.select = [&targeting](const std::string& name) -> std::shared_ptr<const AdapterOptions> {
    auto options = targeting.select(name);
    if (!options) return nullptr;
    options->validate();
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
    if (auto plain = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)) {
      return torch::nn::AnyModule(std::make_shared<LoRALinearImpl>(plain, options, name));
    }
    return {};
  };
  return inject_adapters(module, t);
}

}  // namespace d9d::peft
