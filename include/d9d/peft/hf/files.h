#pragma once

#include <d9d/model_state/mapper/mapper.h>

#include <nlohmann/json.hpp>

#include <string>

namespace d9d::peft::hf {

/// An adapter file's tensors under their file keys, with or without the
/// `base_model.model.` prefix (`base_model.model.layers.0.q_proj.lora_A.weight`).
using AdapterTensors = model_state::StateDict;

/// A Hugging Face PEFT adapter directory read from disk, without a model.
struct AdapterFiles {
  std::string dir;
  std::string config_path;  // dir/adapter_config.json
  /// The config as written; `peft_type` names a registered method.
  nlohmann::json config;
  std::string peft_type;
  AdapterTensors tensors;
  std::string weights_path;  // adapter_model.safetensors (or .bin)
};

/// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`
/// (`adapter_model.bin` where there is no safetensors file): the one reader
/// of adapter directories, used by `load_adapter` and the offline merge.
/// Throws `PeftError` when the directory is no adapter, `ConfigError` for
/// invalid JSON or a `peft_type` no registered method reads, and
/// `CheckpointError` for the weights.
AdapterFiles read_adapter_files(const std::string& dir);

/// The `adapter_config.json` step of `read_adapter_files`: `text` must be a
/// JSON object whose `peft_type` a registered method reads. Returns the
/// config and sets `peft_type`; `ConfigError` naming `config_path` otherwise.
nlohmann::json parse_adapter_config_text(const std::string& text, const std::string& config_path,
                                         std::string& peft_type);

}  // namespace d9d::peft::hf
