#pragma once

#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/mapper.h>
#include <d9d/peft/base.h>
#include <d9d/peft/hf/config.h>

#include <memory>
#include <optional>
#include <string>

namespace torch::nn {
class Module;
}

namespace d9d::peft::hf {

/// The prefix PEFT puts before module paths in adapter files.
inline const std::string kPeftKeyPrefix = "base_model.model.";

/// LoRA driven by a Hugging Face PEFT config: PEFT's target and exclusion
/// rules, rank and alpha patterns, rsLoRA, DoRA, embeddings.
class HfLoRA : public PeftMethod<LoraConfig> {
 public:
  explicit HfLoRA(LoraConfig config);
  PeftInjectionResult inject(torch::nn::Module& module) override;
  void merge(torch::nn::Module& module) override;
};

/// The adapter weights of `module` under PEFT's file keys
/// (`base_model.model.<path>.lora_A.weight`, `...lora_magnitude_vector`,
/// `...lora_embedding_A`): PEFT's `get_peft_model_state_dict`.
model_state::StateDict get_peft_model_state_dict(const torch::nn::Module& module);

/// Loads adapter weights with PEFT's keys (with or without the
/// `base_model.model.` prefix) into the LoRA layers of `module`, strictly:
/// every adapter weight must be given, every given key must be one, shapes
/// must match ("wrong base model?"); values are cast to each layer's dtype.
/// PEFT's `set_peft_model_state_dict`. Nothing is written if anything is off.
void set_peft_model_state_dict(torch::nn::Module& module, const model_state::StateDict& state,
                               const std::string& source = "<state dict>");

/// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`,
/// injects what the config says into `module` (freezing the rest) and loads
/// the weights. Returns the applied method, for `merge_peft`.
///
/// ```
/// auto adapter = d9d::peft::hf::load_adapter(*model, "adapters/my-lora");
/// auto logits = model->forward(ids);
/// d9d::peft::merge_peft(*adapter, *model);
/// ```
/// One adapter per model for now: a module that already holds LoRA layers is
/// an error (merge the first one).
std::unique_ptr<PeftMethodBase> load_adapter(torch::nn::Module& module, const std::string& dir,
                                             const std::string& adapter_name = "default");

struct SaveAdapterOptions {
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> task_type;
};

/// Writes the LoRA layers of `module` to `dir` as PEFT does:
/// `adapter_model.safetensors` (keys without the adapter name,
/// `{"format":"pt"}` metadata) and `adapter_config.json` (sorted; targets are
/// the adapted modules' names; differing ranks or alphas go to
/// `rank_pattern`/`alpha_pattern`). Both files are written atomically.
void save_adapter(const torch::nn::Module& module, const std::string& dir, const SaveAdapterOptions& options = {});

}  // namespace d9d::peft::hf
