// The LoRA method: d9d config in, adapters injected and merged, registered
// under kind "lora" and PEFT's peft_type "LORA".
#include <d9d/peft/adapters.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/config.h>
#include <d9d/peft/hf/merge.h>
#include <d9d/peft/lora/method.h>

#include <fmt/format.h>

#include "../builtin_methods.h"
#include "../config_json.h"

namespace d9d::peft {

LoRA::LoRA(LoRAConfig config)
    : PeftMethod(std::move(config)), pattern_(config_json::validated_pattern(config_), "module_name_pattern") {}

PeftInjectionResult LoRA::inject(torch::nn::Module& module) {
  LoRATargeting targeting;
  targeting.what = fmt::format("module_name_pattern \"{}\"", config_.module_name_pattern);
  targeting.hint = "it must match the whole qualified name";
  const LoRAParameters options = config_.params;
  targeting.select = [this, options](const std::string& name) -> std::optional<LoRAParameters> {
    if (pattern_.full_match(name)) return options;
    return std::nullopt;
  };
  return inject_lora(module, targeting);
}

void LoRA::merge(torch::nn::Module& module) {
  merge_adapter(
      module, [this](const std::string& name) { return pattern_.full_match(name); }, kDefaultAdapterName);
}

PeftMethodRegistration lora_registration() {
  PeftMethodRegistration r = d9d_config_registration<LoRAConfig, LoRA>(&parse_lora_config_json);
  r.peft_type = "LORA";
  r.load_hf_config = [](const nlohmann::json& j, const std::string& source,
                        const std::string& adapter_name) -> std::unique_ptr<PeftMethodBase> {
    return std::make_unique<hf::HfLoRA>(hf::parse_lora_config(j, source), adapter_name);
  };
  r.write_hf_config = [](const torch::nn::Module& model, const std::string& adapter_name,
                         const hf::SaveAdapterOptions& options) {
    return hf::dump_lora_config(hf::lora_config_of(model, adapter_name, options));
  };
  r.plan_offline_merge = &hf::plan_lora_offline_merge;
  return r;
}

}  // namespace d9d::peft
