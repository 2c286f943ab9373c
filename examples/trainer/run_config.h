#pragma once
// The trainer's run configuration: a JSON document whose `peft` section is a
// d9d AnyPeftConfig. Every field is optional; missing ones keep the built-in
// default (`d9d-peft-train --print-config` shows them all).

#include <d9d/peft/all/config.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>

namespace trainer {

/// The synthetic languages: `symbols` content tokens plus two markers.
/// Task A (copy):    x1 .. xL  COPY  x1 .. xL
/// Task B (reverse): x1 .. xL  REV   xL .. x1
struct TaskConfig {
  int64_t symbols = 24;
  int64_t length = 8;
  int64_t eval_sequences = 1024;
};

/// A routed mixture of experts in place of each block's MLP.
struct MoeConfig {
  int64_t experts = 8;
  int64_t top_k = 2;
};

struct ModelConfig {
  int64_t d_model = 128;
  int64_t n_layers = 2;
  int64_t n_heads = 4;
  /// The MLP's hidden width; with `moe`, each expert's.
  int64_t d_ff = 256;
  /// Absent: a dense GELU MLP per block.
  std::optional<MoeConfig> moe;
};

struct OptimConfig {
  int64_t steps = 0;
  int64_t batch_size = 64;
  double lr = 3e-3;
  double weight_decay = 0.0;
  int64_t warmup_steps = 0;
  /// Gradients are clipped to this global norm; 0 turns clipping off.
  double max_grad_norm = 1.0;
};

/// Fine-tuning: an OptimConfig that also says when to write a training
/// checkpoint (`<out>/checkpoint/`, which `--resume` continues from).
struct FinetuneConfig : OptimConfig {
  /// A checkpoint every N steps (and after the last one); 0: none on a schedule
  /// (an interrupt or `--stop-after-step` still writes one).
  int64_t save_every = 0;
};

struct RunConfig {
  std::string name = "default";
  uint64_t seed = 0;
  std::string device = "cpu";
  /// Intra-op CPU threads; 0 keeps LibTorch's default (one per core). One is
  /// fastest for models this small, and robust on a shared machine.
  int64_t threads = 1;
  /// Where the base model lives; empty means `<out>/base`.
  std::string base_checkpoint;
  int64_t log_every = 50;
  TaskConfig task;
  ModelConfig model;
  OptimConfig pretrain;
  FinetuneConfig finetune;
  d9d::peft::AnyPeftConfig peft;
};

/// The built-in configuration the trainer runs with no arguments.
RunConfig default_config();

/// Reads `j` over `base`: fields present replace the defaults (`peft`
/// replaces the whole section). Unknown fields and invalid values throw
/// `d9d::peft::ConfigError` whose path names the field (`model.d_model`).
RunConfig parse_run_config(const nlohmann::json& j, RunConfig base = default_config());

/// Reads and parses a config file; errors are prefixed with `path`.
RunConfig load_run_config(const std::string& path);

/// The complete configuration, every field present, in documentation order.
nlohmann::ordered_json to_json(const RunConfig& config);

/// Checks the rules that span fields (d_model divisible by n_heads, ...).
void validate(const RunConfig& config);

}  // namespace trainer
