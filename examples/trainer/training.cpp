#include "training.h"

#include <ATen/ATen.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <unistd.h>

namespace trainer {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string format_duration(double s) {
  const long total = std::lround(std::max(0.0, s));
  char buf[32];
  if (total >= 3600) {
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", total / 3600, total / 60 % 60, total % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%ld:%02ld", total / 60, total % 60);
  }
  return buf;
}

/// The live line on stderr: redrawn in place (at most ten times a second)
/// on a terminal, one line every `log_every` steps otherwise.
class ProgressLine {
 public:
  ProgressLine(std::string phase, int64_t total, int64_t log_every)
      : phase_(std::move(phase)), total_(total), log_every_(log_every), tty_(::isatty(STDERR_FILENO) == 1) {}

  void update(int64_t step, double loss, double tokens_per_s, double elapsed, bool last) {
    const bool due = tty_ ? (last || seconds_since(last_draw_) >= 0.1) : (last || step == 1 || step % log_every_ == 0);
    if (!due) return;
    last_draw_ = Clock::now();
    const double eta = step > 0 ? elapsed / static_cast<double>(step) * static_cast<double>(total_ - step) : 0.0;
    const int width = static_cast<int>(std::to_string(total_).size());
    std::fprintf(stderr, "%s%-8s step %*lld/%lld  loss %.4f  %6.1fk tok/s  elapsed %s  ETA %s%s", tty_ ? "\r" : "",
                 phase_.c_str(), width, static_cast<long long>(step), static_cast<long long>(total_), loss,
                 tokens_per_s / 1000.0, format_duration(elapsed).c_str(), format_duration(eta).c_str(),
                 tty_ ? "\033[K" : "\n");
    if (tty_ && last) std::fputc('\n', stderr);
    std::fflush(stderr);
  }

 private:
  std::string phase_;
  int64_t total_;
  int64_t log_every_;
  bool tty_;
  Clock::time_point last_draw_{};
};

double learning_rate(const OptimConfig& c, int64_t step) {
  if (step < c.warmup_steps) return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  const double span = static_cast<double>(std::max<int64_t>(1, c.steps - c.warmup_steps));
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup_steps) / span);
  return c.lr * (0.1 + 0.9 * 0.5 * (1.0 + std::cos(M_PI * progress)));
}

}  // namespace

const char* task_label(Task task) { return task == Task::Copy ? "A (copy)" : "B (reverse)"; }

int64_t vocab_size(const TaskConfig& c) { return c.symbols + 2; }
int64_t context_size(const TaskConfig& c) { return 2 * c.length; }

Batch make_batch(Task task, const TaskConfig& c, int64_t batch_size, std::mt19937_64& rng) {
  const int64_t L = c.length;
  const int64_t marker = task == Task::Copy ? c.symbols : c.symbols + 1;
  std::uniform_int_distribution<int64_t> symbol(0, c.symbols - 1);
  at::Tensor inputs = at::empty({batch_size, 2 * L}, at::kLong);
  at::Tensor answers = at::empty({batch_size, L}, at::kLong);
  int64_t* in = inputs.data_ptr<int64_t>();
  int64_t* ans = answers.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch_size; ++b) {
    int64_t* x = in + b * 2 * L;
    int64_t* y = ans + b * L;
    for (int64_t i = 0; i < L; ++i) x[i] = symbol(rng);
    x[L] = marker;
    for (int64_t i = 0; i < L; ++i) y[i] = task == Task::Copy ? x[i] : x[L - 1 - i];
    for (int64_t i = 0; i + 1 < L; ++i) x[L + 1 + i] = y[i];  // the answer, shifted: teacher forcing
  }
  return {inputs, answers};
}

Batch heldout_set(Task task, const TaskConfig& c) {
  std::mt19937_64 rng(task == Task::Copy ? 0xA11CE : 0xB0B);
  return make_batch(task, c, c.eval_sequences, rng);
}

at::Tensor answer_logits(Gpt& model, const at::Tensor& inputs, const TaskConfig& c) {
  at::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  std::vector<at::Tensor> parts;
  for (int64_t begin = 0; begin < inputs.size(0); begin += 512) {
    const at::Tensor chunk = inputs.slice(0, begin, std::min(inputs.size(0), begin + 512));
    parts.push_back(model->forward(chunk).slice(1, c.length, 2 * c.length));
  }
  model->train(was_training);
  return at::cat(parts, 0);
}

double accuracy(Gpt& model, Task task, const TaskConfig& c, c10::Device device) {
  const Batch set = heldout_set(task, c);
  const at::Tensor predicted = answer_logits(model, set.inputs.to(device), c).argmax(-1);
  return predicted.eq(set.answers.to(device)).to(at::kDouble).mean().item<double>();
}

TrainResult train(Gpt& model, const std::vector<at::Tensor>& parameters, Task task, const TaskConfig& task_config,
                  const OptimConfig& optim, const TrainOptions& options) {
  TrainResult result;
  if (optim.steps == 0) return result;
  torch::optim::AdamW optimizer(parameters,
                                torch::optim::AdamWOptions(optim.lr).weight_decay(optim.weight_decay));
  std::mt19937_64 rng(options.seed * 1000003ull + (task == Task::Copy ? 11 : 17));
  ProgressLine progress(options.phase, optim.steps, options.log_every);
  model->train();
  const auto start = Clock::now();
  const int64_t vocab = vocab_size(task_config);
  for (int64_t step = 0; step < optim.steps; ++step) {
    for (auto& group : optimizer.param_groups()) {
      static_cast<torch::optim::AdamWOptions&>(group.options()).lr(learning_rate(optim, step));
    }
    const Batch batch = make_batch(task, task_config, optim.batch_size, rng);
    const at::Tensor inputs = batch.inputs.to(options.device), answers = batch.answers.to(options.device);
    optimizer.zero_grad();
    const at::Tensor logits = model->forward(inputs).slice(1, task_config.length, 2 * task_config.length);
    const at::Tensor loss = at::cross_entropy_loss(logits.reshape({-1, vocab}), answers.reshape({-1}));
    loss.backward();
    if (optim.max_grad_norm > 0) torch::nn::utils::clip_grad_norm_(parameters, optim.max_grad_norm);
    optimizer.step();

    result.steps = step + 1;
    result.final_loss = loss.item<double>();
    result.tokens += inputs.numel();
    result.seconds = seconds_since(start);
    result.interrupted = options.stop && options.stop->load();
    const bool last = result.steps == optim.steps || result.interrupted;
    progress.update(result.steps, result.final_loss, static_cast<double>(result.tokens) / result.seconds,
                    result.seconds, last);
    if (result.interrupted) break;
  }
  model->eval();
  return result;
}

}  // namespace trainer
