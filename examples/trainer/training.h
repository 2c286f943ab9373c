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

struct TrainOptions {
  std::string phase;  // "pretrain", "finetune": names the progress line
  c10::Device device = c10::kCPU;
  uint64_t seed = 0;
  int64_t log_every = 50;
  /// Checked after every step; when set, training stops there.
  const std::atomic<bool>* stop = nullptr;
};

struct TrainResult {
  int64_t steps = 0;
  double seconds = 0;
  double final_loss = 0;
  int64_t tokens = 0;
  bool interrupted = false;
};

/// AdamW over `parameters` on batches of `task`: linear warm-up, then cosine
/// decay to a tenth of the rate. Loss: cross-entropy on the answer tokens.
/// Draws a live progress line on stderr.
TrainResult train(Gpt& model, const std::vector<at::Tensor>& parameters, Task task, const TaskConfig& task_config,
                  const OptimConfig& optim, const TrainOptions& options);

}  // namespace trainer
