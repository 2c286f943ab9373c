#include "training.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <torch/serialize.h>
#include <torch/utils.h>

#include <chrono>
#include <tuple>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <type_traits>
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
  /// `first`: the steps done before this run (a resumed one), which the rate
  /// and the ETA leave out.
  ProgressLine(std::string phase, int64_t first, int64_t total, int64_t log_every)
      : phase_(std::move(phase)),
        first_(first),
        total_(total),
        log_every_(log_every),
        tty_(::isatty(STDERR_FILENO) == 1) {}

  void update(int64_t step, double loss, double tokens_per_s, double elapsed, bool last) {
    const bool due =
        tty_ ? (last || seconds_since(last_draw_) >= 0.1) : (last || step == first_ + 1 || step % log_every_ == 0);
    if (!due) return;
    last_draw_ = Clock::now();
    const int64_t done = step - first_;
    const double eta = done > 0 ? elapsed / static_cast<double>(done) * static_cast<double>(total_ - step) : 0.0;
    std::fprintf(stderr, "%s%s  loss %.4f  %6.1fk tok/s  elapsed %s  ETA %s%s", tty_ ? "\r" : "", label(step).c_str(),
                 loss, tokens_per_s / 1000.0, format_duration(elapsed).c_str(), format_duration(eta).c_str(),
                 tty_ ? "\033[K" : "\n");
    if (tty_ && last) std::fputc('\n', stderr);
    std::fflush(stderr);
  }

  /// A line of its own after step `step` (on a terminal it replaces the live
  /// line, which is drawn again at the next step).
  void note(int64_t step, const std::string& text) {
    std::fprintf(stderr, "%s%s  %s\n", tty_ ? "\r\033[K" : "", label(step).c_str(), text.c_str());
    std::fflush(stderr);
    last_draw_ = {};
  }

 private:
  std::string label(int64_t step) const {
    const int width = static_cast<int>(std::to_string(total_).size());
    char buf[96];
    std::snprintf(buf, sizeof buf, "%-8s step %*lld/%lld", phase_.c_str(), width, static_cast<long long>(step),
                  static_cast<long long>(total_));
    return buf;
  }

  std::string phase_;
  int64_t first_;
  int64_t total_;
  int64_t log_every_;
  bool tty_;
  Clock::time_point last_draw_{};
};

at::Tensor generator_state(c10::Device device) {
  at::Generator generator = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

void set_generator_state(c10::Device device, const at::Tensor& state) {
  at::Generator generator = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state);
}

/// The optimizer's key for `p` in `state()`: the TensorImpl's address as text
/// in LibTorch 1.x, the address itself in 2.x.
template <typename Key>
Key state_key(const at::Tensor& p) {
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream s;
    s << p.unsafeGetTensorImpl();
    return s.str();
  } else {
    return static_cast<Key>(p.unsafeGetTensorImpl());
  }
}

std::string shape(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

/// Puts `state` into the optimizer and the random streams; throws naming
/// `state.origin` when it does not fit the parameters or this LibTorch.
void restore(const TrainingState& state, torch::optim::AdamW& optimizer, std::mt19937_64& rng,
             const std::vector<at::Tensor>& parameters, c10::Device device) {
  const std::string where = state.origin.empty() ? std::string("the checkpoint") : state.origin;
  std::istringstream data_rng(state.data_rng);
  data_rng >> rng;
  if (data_rng.fail()) throw std::runtime_error(where + ": data_rng is not a std::mt19937_64 state");
  try {
    std::istringstream in(state.optimizer);
    torch::load(optimizer, in, device);
  } catch (const c10::Error& e) {
    throw std::runtime_error(where + ": the optimizer state does not load: " + e.what_without_backtrace());
  }
  // torch::load pairs the saved moments with the parameters by position and
  // checks only their number: check each moment fits its parameter.
  using Key = typename std::decay_t<decltype(optimizer.state())>::key_type;
  for (size_t i = 0; i < parameters.size(); ++i) {
    const auto it = optimizer.state().find(state_key<Key>(parameters[i]));
    if (it == optimizer.state().end()) continue;  // never stepped (no gradient yet): fresh moments, as saved
    const auto& moments = static_cast<const torch::optim::AdamWParamState&>(*it->second);
    if (!moments.exp_avg().sizes().equals(parameters[i].sizes()) ||
        !moments.exp_avg_sq().sizes().equals(parameters[i].sizes())) {
      throw std::runtime_error(where + ": the optimizer state of trainable parameter #" + std::to_string(i) +
                               " has shape " + shape(moments.exp_avg()) + ", the parameter " +
                               shape(parameters[i]));
    }
  }
  try {
    set_generator_state(c10::kCPU, state.cpu_rng);
    if (!device.is_cpu()) {
      if (!state.device_rng.defined()) throw std::runtime_error(where + ": no generator state for " + device.str());
      set_generator_state(device, state.device_rng);
    }
  } catch (const c10::Error& e) {
    throw std::runtime_error(where + ": the random generator state does not load: " + e.what_without_backtrace());
  }
}

TrainingState capture(const TrainResult& result, const torch::optim::AdamW& optimizer, const std::mt19937_64& rng,
                      c10::Device device) {
  TrainingState state;
  state.step = result.steps;
  state.loss = result.final_loss;
  std::ostringstream data_rng;
  data_rng << rng;
  state.data_rng = data_rng.str();
  state.cpu_rng = generator_state(c10::kCPU);
  if (!device.is_cpu()) state.device_rng = generator_state(device).cpu();
  std::ostringstream out;
  torch::save(optimizer, out);
  state.optimizer = out.str();
  return state;
}

/// The dropout seed of one process's part of one step (splitmix64 of the three).
uint64_t dropout_seed(uint64_t seed, int64_t step, int64_t part) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(step) * 0xBF58476D1CE4E5B9ull +
               static_cast<uint64_t>(part) * 0x94D049BB133111EBull + 1;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

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
  const int64_t first = options.resume ? options.resume->step : 0;
  result.first_step = result.steps = first;
  if (options.resume) result.final_loss = options.resume->loss;
  if (first >= optim.steps) return result;  // nothing (left) to train
  if (options.stop_after > 0 && first >= options.stop_after) {
    result.stopped = true;  // already there: the state is the resumed one
    return result;
  }
  torch::optim::AdamW optimizer(parameters,
                                torch::optim::AdamWOptions(optim.lr).weight_decay(optim.weight_decay));
  std::mt19937_64 rng(options.seed * 1000003ull + (task == Task::Copy ? 11 : 17));
  if (options.resume) restore(*options.resume, optimizer, rng, parameters, options.device);
  ProgressLine progress(options.phase, first, optim.steps, options.log_every);
  model->train();
  const auto start = Clock::now();
  const int64_t vocab = vocab_size(task_config);
  for (int64_t step = first; step < optim.steps; ++step) {
    for (auto& group : optimizer.param_groups()) {
      static_cast<torch::optim::AdamWOptions&>(group.options()).lr(learning_rate(optim, step));
    }
    const Batch batch = make_batch(task, task_config, optim.batch_size, rng);
    at::Tensor inputs = batch.inputs, answers = batch.answers;
    if (options.shard_count > 1) {
      const int64_t rows = optim.batch_size / options.shard_count;
      inputs = inputs.slice(0, options.shard_index * rows, (options.shard_index + 1) * rows);
      answers = answers.slice(0, options.shard_index * rows, (options.shard_index + 1) * rows);
      torch::manual_seed(dropout_seed(options.seed, step, options.shard_index));
    }
    inputs = inputs.to(options.device);
    answers = answers.to(options.device);
    optimizer.zero_grad();
    const at::Tensor logits = model->forward(inputs).slice(1, task_config.length, 2 * task_config.length);
    const at::Tensor loss = at::cross_entropy_loss(logits.reshape({-1, vocab}), answers.reshape({-1}));
    loss.backward();
    if (optim.max_grad_norm > 0) torch::nn::utils::clip_grad_norm_(parameters, optim.max_grad_norm);
    optimizer.step();

    result.steps = step + 1;
    double loss_value = loss.item<double>();
    bool stop_now = options.stop && options.stop->load();
    if (options.agree) std::tie(loss_value, stop_now) = options.agree(loss_value, stop_now);
    result.final_loss = loss_value;
    result.tokens += batch.inputs.numel();
    result.seconds = seconds_since(start);
    result.interrupted = stop_now;
    result.stopped = !result.interrupted && options.stop_after > 0 && result.steps == options.stop_after &&
                     result.steps < optim.steps;
    const bool last = result.steps == optim.steps || result.interrupted || result.stopped;
    if (options.primary) {
      progress.update(result.steps, result.final_loss, static_cast<double>(result.tokens) / result.seconds,
                      result.seconds, last);
    }
    const bool save = (options.save_every > 0 && result.steps % options.save_every == 0) || result.interrupted ||
                      result.stopped || (result.steps == optim.steps && options.save_at_end);
    if (save && options.primary && options.save_checkpoint) {
      const auto save_start = Clock::now();
      const std::string where = options.save_checkpoint(capture(result, optimizer, rng, options.device));
      char took[32];
      std::snprintf(took, sizeof took, "%.2f s", seconds_since(save_start));
      progress.note(result.steps, "checkpoint saved to " + where + " (" + took + ")");
    }
    if (result.interrupted || result.stopped) break;
  }
  model->eval();
  return result;
}

}  // namespace trainer
