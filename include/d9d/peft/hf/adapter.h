#pragma once

#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/mapper.h>
#include <d9d/peft/base.h>
#include <d9d/peft/hf/config.h>
#include <d9d/peft/hf/target_parameters.h>

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
/// rules, rank and alpha patterns, rsLoRA, DoRA, embeddings. Adds adapter
/// `adapter_name` (see `inject_lora` for how a second adapter joins a model);
/// `merge` folds that adapter alone into the base weights and removes it.
class HfLoRA : public PeftMethod<LoraConfig> {
 public:
  explicit HfLoRA(LoraConfig config, std::string adapter_name = kDefaultAdapterName);
  PeftInjectionResult inject(torch::nn::Module& module) override;
  void merge(torch::nn::Module& module) override;
  const std::string& adapter_name() const noexcept { return adapter_name_; }

 private:
  std::string adapter_name_;
};

/// The weights of one adapter of `module` under PEFT's file keys
/// (`base_model.model.<path>.lora_A.weight`, `...lora_magnitude_vector`,
/// `...lora_embedding_A`; no adapter name in them): PEFT's
/// `get_peft_model_state_dict`. `adapter_name` may be left empty when the
/// model holds a single adapter. Grouped expert layers (`d9d::nn::GroupedLinear`)
/// come as PEFT's `target_parameters` write them: under the owning module's
/// path with one `base_layer.` per targeted sibling registered after the layer,
/// `lora_A.weight` `[r·E, in]` (rows in blocks of r per expert), `lora_B.weight`
/// `[out, r·E]` (columns interleaved), laid out for `experts.storage()`.
model_state::StateDict get_peft_model_state_dict(const torch::nn::Module& module, const std::string& adapter_name = {},
                                                 const ExpertOptions& experts = {});

/// Loads adapter weights with PEFT's keys (with or without the
/// `base_model.model.` prefix) into adapter `adapter_name` (empty: the only
/// one) of `module`, strictly: every weight of that adapter must be given,
/// every given key must be one, shapes must match ("wrong base model?");
/// values are cast to each layer's dtype. PEFT's `set_peft_model_state_dict`.
/// Nothing is written if anything is off. Grouped expert layers take the
/// factors in PEFT's `target_parameters` form (see `get_peft_model_state_dict`);
/// their convention is read from the shapes, from `experts.storage()` where a
/// layer is square.
void set_peft_model_state_dict(torch::nn::Module& module, const model_state::StateDict& state,
                               const std::string& source = "<state dict>", const std::string& adapter_name = {},
                               const ExpertOptions& experts = {});

/// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`,
/// adds what the config says to `module` as adapter `adapter_name` and loads
/// the weights. Returns the applied method, for `merge_peft`.
///
/// ```
/// auto adapter = d9d::peft::hf::load_adapter(*model, "adapters/my-lora");
/// auto logits = model->forward(ids);
/// d9d::peft::merge_peft(*adapter, *model);
/// ```
///
/// Into a model without adapters, the adapter comes active and trainable and
/// everything else is frozen (as `inject_peft_and_freeze`). Into a model that
/// has adapters, it is added inactive and frozen, as PEFT's `load_adapter`
/// does: `set_adapter(*model, adapter_name)` activates it. A name already in
/// the model is an error. On any error the model is left as it was.
///
/// A config with `target_parameters` (PEFT's LoRA on 3-D expert parameters)
/// adapts the grouped expert layers it names; `experts` says how the model
/// PEFT saw stored them, which matters only for square experts (see
/// `ExpertStorage`; docs/moe.md).
std::unique_ptr<PeftMethodBase> load_adapter(torch::nn::Module& module, const std::string& dir,
                                             const std::string& adapter_name = kDefaultAdapterName,
                                             const ExpertOptions& experts = {});

/// Adds a fresh adapter `adapter_name` configured by `config` (PEFT's
/// `add_adapter`; as `load_adapter` without the weights file): active and
/// trainable in a model without adapters, inactive and frozen otherwise.
std::unique_ptr<PeftMethodBase> add_adapter(torch::nn::Module& module, const std::string& adapter_name,
                                            const LoraConfig& config);

struct SaveAdapterOptions {
  /// Which adapter to write; empty: the only one (an error if there are several).
  std::string adapter_name;
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> task_type;
  /// PiSSA and OLoRA adapters, whose initialisation moved part of the base
  /// weight into them: write the plain LoRA adapter that applies the same
  /// change to the original base weight (PEFT's
  /// `path_initial_model_for_weight_conversion`): `lora_A = [A; A0]`,
  /// `lora_B = [B, -B0]` with `A0`, `B0` the factors at initialisation, twice
  /// the rank, the same scale, `init_lora_weights: true`. Without it the file
  /// holds `A`, `B` and `init_lora_weights: "pissa"`/"olora", which PEFT loads
  /// onto the original base model by redoing the initialisation.
  bool convert_to_lora = false;
  /// How the grouped expert layers' factors are laid out for the model PEFT
  /// will load them into (see `ExpertStorage`).
  ExpertOptions experts;
};

/// The `LoraConfig` that describes LoRA adapter `adapter_name` of `module`:
/// targets are the adapted modules' names (grouped expert layers' in
/// `target_parameters`, the others' in `target_modules`, null when there are
/// none); ranks and alphas that differ from the first layer's go to
/// `rank_pattern`/`alpha_pattern`. `PeftError` where a
/// PEFT config cannot express the layers (per-module dropout, rsLoRA or DoRA).
LoraConfig lora_config_of(const torch::nn::Module& module, const std::string& adapter_name,
                          const SaveAdapterOptions& options = {});

/// Writes one adapter of `module` (`options.adapter_name`) to `dir` as PEFT does:
/// `adapter_model.safetensors` (keys without the adapter name,
/// `{"format":"pt"}` metadata) and `adapter_config.json` (written by the
/// method registered for the layers' `peft_type`; for LoRA `lora_config_of`).
/// Both files are written atomically.
void save_adapter(const torch::nn::Module& module, const std::string& dir, const SaveAdapterOptions& options = {});

}  // namespace d9d::peft::hf
