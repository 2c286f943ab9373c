#pragma once
// The built-in synthetic tasks, their score, and the training loop.
//
// Two "languages" over `symbols` content tokens and two marker tokens:
//   task A (copy):    x1 x2 .. xL  COPY  x1 x2 .. xL
//   task B (reverse): x1 x2 .. xL  REV   xL .. x2 x1
// The x are uniform random, so only the L tokens after the marker can be
// predicted; the score is the next-token accuracy on them (chance is
// 1 / symbols). The base model learns A; the adapter learns B.

#include "gpt.h"
#include "run_config.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace trainer {

enum class Task { Copy, Reverse };

/// "A (copy)" or "B (reverse)".
const char* task_label(Task task);

/// symbols + the two markers.
int64_t vocab_size(const TaskConfig& config);
/// The model's input length: 2 * length.
int64_t context_size(const TaskConfig& config);

/// Inputs `[batch, 2L]` (the sequence without its last token) and the
/// answers `[batch, L]`, which the logits at positions L .. 2L-1 predict.
struct Batch {
  at::Tensor inputs;
  at::Tensor answers;
};

Batch make_batch(Task task, const TaskConfig& config, int64_t batch_size, std::mt19937_64& rng);

/// The held-out set: `config.eval_sequences` sequences from a fixed stream
/// that does not depend on the run's seed (training never draws from it).
Batch heldout_set(Task task, const TaskConfig& config);

/// Logits at the answer positions, `[n, L, vocab]`, in eval mode without gradients.
at::Tensor answer_logits(Gpt& model, const at::Tensor& inputs, const TaskConfig& config);

/// Next-token accuracy on the answers of the held-out set, in [0, 1].
double accuracy(Gpt& model, Task task, const TaskConfig& config, c10::Device device);

/// Where training stands after a step, beyond the trainable parameters' values:
/// with those, what a training checkpoint holds to continue exactly.
struct TrainingState {
  /// Steps done; training goes on with step index `step` (0-based).
  int64_t step = 0;
  /// The loss of the last step done.
  double loss = 0;
  /// The batch stream's std::mt19937_64, as its `operator<<` writes it.
  std::string data_rng;
  /// LibTorch's default CPU generator (LoRA dropout on the CPU draws from it).
  at::Tensor cpu_rng;
  /// The default generator of the CUDA device trained on; undefined on the CPU.
  at::Tensor device_rng;
  /// The AdamW state, as `torch::save(optimizer, stream)` writes it.
  std::string optimizer;
  /// Where it was read from, for error messages.
  std::string origin;
};

struct TrainOptions {
  std::string phase;  // "pretrain", "finetune": names the progress line
  c10::Device device = c10::kCPU;
  uint64_t seed = 0;
  int64_t log_every = 50;
  /// Checked after every step; when set, training stops there.
  const std::atomic<bool>* stop = nullptr;
  /// Stop after this step (1-based) as if interrupted, with
  /// `TrainResult::stopped`; 0, or at least `steps`: run to the end.
  int64_t stop_after = 0;
  /// Writes a checkpoint of the state it is given, the trainable parameters
  /// being the model's at that moment, and returns where it went (for the
  /// progress line). Called after every `save_every`-th step (0: never on a
  /// schedule), after the last step when `save_at_end`, and when training
  /// stops early (interrupted or `stop_after`). Unset: no checkpoints.
  std::function<std::string(const TrainingState&)> save_checkpoint;
  int64_t save_every = 0;
  bool save_at_end = false;
  /// Continue from this state: the trainable parameters must already hold the
  /// values saved with it. The batches, dropout masks, optimizer moments and
  /// learning rates then go on as if training had never stopped.
  const TrainingState* resume = nullptr;
  /// Whether this process writes checkpoints and draws the progress line. In
  /// a data-parallel run every process holds the same parameters, optimizer
  /// state and random states, so one process's checkpoint restores them all;
  /// only that one should write it.
  bool primary = true;
  /// Data-parallel: this process trains on part `shard_index` of
  /// `shard_count` equal parts of every batch (`batch_size` is the global
  /// batch, the same whatever the number of processes). Each process then
  /// draws its dropout masks from a stream of its own, seeded from the run's
  /// seed, the step and the part, so a resumed run draws them again.
  int64_t shard_index = 0;
  int64_t shard_count = 1;
  /// Data-parallel: called by every process after every step with its loss
  /// and whether it was asked to stop; returns the mean loss over the
  /// processes and whether any was asked to stop, so that all stop after the
  /// same step. Unset: one process.
  std::function<std::pair<double, bool>(double loss, bool stop)> agree;
};

struct TrainResult {
  /// Steps done in all, those before a resume included.
  int64_t steps = 0;
  /// Where this run started: the resumed state's step, else 0.
  int64_t first_step = 0;
  /// Seconds and tokens (of the global batches) of this run's steps.
  double seconds = 0;
  double final_loss = 0;
  int64_t tokens = 0;
  bool interrupted = false;
  /// Stopped by `TrainOptions::stop_after` before the last step.
  bool stopped = false;
};

/// AdamW over `parameters` on batches of `task`: linear warm-up, then cosine
/// decay to a tenth of the rate. Loss: cross-entropy on the answer tokens.
/// Draws a live progress line on stderr, and a line for each checkpoint written.
TrainResult train(Gpt& model, const std::vector<at::Tensor>& parameters, Task task, const TaskConfig& task_config,
                  const OptimConfig& optim, const TrainOptions& options);

}  // namespace trainer
