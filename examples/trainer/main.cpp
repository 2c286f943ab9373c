// d9d-peft-train: the whole PEFT lifecycle on a small GPT, with no download.
//
// pretrain the base on task A (once; saved as a safetensors checkpoint)
//   -> build a fresh model, inject PEFT, load the base through the mapper
//   -> fine-tune the adapter on task B -> score A and B
//   -> save the adapter (Hugging Face PEFT format; LoRA on grouped experts in
//      the trainer's own form) and what full_tune trained
//      (full_tune/model.safetensors, under the base's keys); load them back
//   -> merge, check merged == unmerged, export the merged checkpoint.
// Fine-tuning can stop (Ctrl-C, --stop-after-step) and go on later from its
// training checkpoint (--resume) with exactly the result of an unbroken run.
#include "checkpoint.h"
#include "gpt.h"
#include "run_config.h"
#include "training.h"

#include <d9d/distributed/data_parallel.h>
#include <d9d/distributed/launch.h>
#include <d9d/distributed/process_group.h>
#include <d9d/peft.h>
#include <d9d/peft/lora/grouped_linear.h>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>
#include <torch/utils.h>

#ifdef D9D_TRAIN_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
namespace peft = d9d::peft;
namespace dist = d9d::distributed;
using trainer::Task;

namespace {

constexpr const char* kUsage = R"(usage: d9d-peft-train [--config FILE] [--out DIR] [--device cpu|cuda] [--steps N]
                      [--stop-after-step N] [--resume] [--nproc N] [--print-config]

Pretrains a small GPT on synthetic task A (copy) unless a base checkpoint exists, fine-tunes
a PEFT adapter on task B (reverse), and reports scores, parameters, time and memory.

  --config FILE          JSON run config; missing fields keep the built-in default
  --out DIR              where everything is written (default: ./runs/<name>)
  --device DEV           cpu, cuda or cuda:N (overrides the config's "device")
  --steps N              fine-tuning steps (overrides finetune.steps)
  --stop-after-step N    stop fine-tuning after step N, save the adapter and the training
                         checkpoint (<out>/checkpoint), and exit with 0
  --resume               continue fine-tuning from <out>/checkpoint: no pretraining (the base
                         must exist), same config except finetune.steps; the result is that
                         of a run that never stopped
  --nproc N              train data-parallel on N processes of this machine, started by this one
                         (Gloo on the CPU, NCCL on CUDA: rank r on cuda:r); the batch sizes are
                         global and must divide by N. Under torchrun (or another launcher setting
                         RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) each process is one rank already
  --print-config         print the effective config as JSON and exit
  -h, --help             this text

Ctrl-C stops after the current step and saves the adapter (and full_tune weights) trained so far
and the training checkpoint (exit status 130); --resume continues from there. finetune.save_every
also writes the checkpoint every N steps.
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::optional<std::string> config, out, device;
  std::optional<int64_t> steps, stop_after_step, nproc;
  bool resume = false;
  bool print_config = false;
  bool help = false;
};

int64_t parse_count(const std::string& option, const std::string& v, int64_t min) {
  size_t used = 0;
  long long n = -1;
  try {
    n = std::stoll(v, &used);
  } catch (const std::exception&) {
  }
  if (used != v.size() || n < min) {
    throw UsageError(option + " expects an integer >= " + std::to_string(min) + ", got \"" + v + "\"");
  }
  return n;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::optional<std::string> inline_value;
    if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos) {
      inline_value = arg.substr(arg.find('=') + 1);
      arg = arg.substr(0, arg.find('='));
    }
    auto value = [&]() -> std::string {
      if (inline_value) return *inline_value;
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--config") a.config = value();
    else if (arg == "--out") a.out = value();
    else if (arg == "--device") a.device = value();
    else if (arg == "--steps") a.steps = parse_count(arg, value(), 0);
    else if (arg == "--stop-after-step") a.stop_after_step = parse_count(arg, value(), 1);
    else if (arg == "--resume" && !inline_value) a.resume = true;
    else if (arg == "--nproc") a.nproc = parse_count(arg, value(), 1);
    else if (arg == "--print-config" && !inline_value) a.print_config = true;
    else if ((arg == "--help" || arg == "-h") && !inline_value) a.help = true;
    else throw UsageError("unknown argument \"" + std::string(argv[i]) + "\"");
  }
  return a;
}

/// The command line that continues this run: the same arguments, without
/// --stop-after-step, with --resume.
std::string continue_command(int argc, char** argv) {
  auto quoted = [](const std::string& a) {
    if (!a.empty() && a.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./:=@%+,-") ==
                          std::string::npos) {
      return a;
    }
    std::string q = "'";
    for (const char c : a) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
  };
  std::string command = quoted(argv[0]);
  bool resume = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--stop-after-step") {
      ++i;  // and its value
      continue;
    }
    if (arg.rfind("--stop-after-step=", 0) == 0) continue;
    resume = resume || arg == "--resume";
    command += " " + quoted(arg);
  }
  return resume ? command : command + " --resume";
}

std::atomic<bool> g_stop{false};
int64_t g_rank = -1;  // data-parallel: this process's rank, which its error messages name

extern "C" void on_sigint(int) {
  g_stop.store(true);
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C ends the process at once
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

/// The process's peak resident memory (VmHWM) in bytes, 0 if unknown.
uint64_t peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  }
  return 0;
}

/// Peak memory allocated by tensors on a CUDA device, or nothing on CPU builds.
std::optional<uint64_t> peak_cuda_bytes(const c10::Device& device) {
#ifdef D9D_TRAIN_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.has_index() ? device.index() : 0);
    return static_cast<uint64_t>(stats.allocated_bytes[0].peak);
  }
#else
  (void)device;
#endif
  return std::nullopt;
}

/// What full_tune trains, read from the injected model rather than the config:
/// the trainable parameters the base checkpoint holds (LoRA's own weights are
/// fresh state, which no base checkpoint holds; they go into the adapter).
/// Base-checkpoint key -> model key, which differ where a LoRA wrapper sits
/// around a fully tuned layer (`q_proj.weight` -> `q_proj.base.weight`).
std::map<std::string, std::string> full_tune_keys(const torch::nn::Module& model, const ms::ModelStateMapper& mapper) {
  std::map<std::string, std::optional<std::string>> base_key;  // none: not loaded from exactly one base key
  for (const auto& group : mapper.state_dependency_groups()) {
    const bool one_to_one = group.inputs.size() == 1 && group.outputs.size() == 1;
    for (const auto& key : group.outputs) {
      base_key[key] = one_to_one ? std::optional<std::string>(*group.inputs.begin()) : std::nullopt;
    }
  }
  std::map<std::string, std::string> keys;
  for (const auto& item : model.named_parameters()) {
    if (!item.value().requires_grad()) continue;
    const auto it = base_key.find(item.key());
    if (it == base_key.end()) continue;  // fresh adapter state
    if (!it->second) {
      throw std::runtime_error("the trained parameter " + item.key() +
                               " is not loaded from exactly one tensor of the base checkpoint, so its full_tune "
                               "weights cannot be saved under the base's keys");
    }
    keys.emplace(*it->second, item.key());
  }
  return keys;
}

/// Writes the full_tune weights: the tuned tensors under the base checkpoint's keys.
void save_full_tune(torch::nn::Module& model, const std::map<std::string, std::string>& keys, const fs::path& file) {
  const auto params = model.named_parameters();
  ms::StateDict tensors;
  for (const auto& [base_key, model_key] : keys) tensors.emplace(base_key, params[model_key].detach());
  fs::create_directories(file.parent_path());
  ms::save_safetensors(file.string(), tensors, {{"format", "pt"}});
}

/// The LoRA layers on grouped experts (d9d::nn::GroupedLinear), which
/// hf::save_adapter cannot write.
std::vector<std::string> grouped_lora_layers(const torch::nn::Module& model) {
  std::vector<std::string> names;
  for (const auto& entry : peft::adapter_layers(model)) {
    if (dynamic_cast<const peft::LoRAGroupedLayer*>(entry.layer) != nullptr) names.push_back(entry.name);
  }
  return names;
}

// The adapter of a model with LoRA on grouped experts, in the trainer's form:
// every trainable parameter under the injected model's keys, and the d9d PEFT
// config that injects the layers they belong to.
constexpr const char* kD9dAdapterTensors = "adapter.safetensors";
constexpr const char* kD9dAdapterConfig = "peft_config.json";

void save_d9d_adapter(const torch::nn::Module& model, const peft::AnyPeftConfig& config, const fs::path& dir) {
  fs::create_directories(dir);
  trainer::save_trainable(dir / kD9dAdapterTensors, model);
  nlohmann::ordered_json j;
  peft::to_json(j, config);
  ms::write_file_atomically((dir / kD9dAdapterConfig).string(), j.dump(2) + "\n");
}

/// The MoE blocks of `model`, in layer order (none for a dense model).
std::vector<trainer::MoeMlpImpl*> moe_blocks(trainer::Gpt& model) {
  std::vector<trainer::MoeMlpImpl*> blocks;
  for (const auto& layer : *model->layers) {
    if (auto& moe = layer->as<trainer::BlockImpl>()->moe) blocks.push_back(moe.get());
  }
  return blocks;
}

bool checkpoint_exists(const fs::path& p) {
  return fs::is_regular_file(p) || fs::exists(p / "model.safetensors") || fs::exists(p / "model.safetensors.index.json");
}

int64_t count(const std::vector<at::Tensor>& tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  return n;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

std::string thousands(int64_t n) {
  const std::string digits = std::to_string(n);
  std::string s;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && digits[i - 1] != '-' && (digits.size() - i) % 3 == 0) s += ',';
    s += digits[i];
  }
  return s;
}

std::string strf(const char* format, ...) __attribute__((format(printf, 1, 2)));
std::string strf(const char* format, ...) {
  char buf[512];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buf, sizeof buf, format, args);
  va_end(args);
  return buf;
}

std::string kib(int64_t bytes) { return strf("%.1f KiB", static_cast<double>(bytes) / 1024.0); }


std::string mib(uint64_t bytes) { return strf("%.1f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0)); }

trainer::GptConfig gpt_config(const trainer::RunConfig& c) {
  trainer::GptConfig g;
  g.vocab = trainer::vocab_size(c.task);
  g.context = trainer::context_size(c.task);
  g.d_model = c.model.d_model;
  g.n_layers = c.model.n_layers;
  g.n_heads = c.model.n_heads;
  g.d_ff = c.model.d_ff;
  if (c.model.moe) {
    g.experts = c.model.moe->experts;
    g.top_k = c.model.moe->top_k;
  }
  return g;
}

ms::LoadOptions quiet_load(const c10::Device& device) {
  ms::LoadOptions o;
  o.device = device;
  o.progress = ms::no_progress();
  return o;
}

/// Loads the base checkpoint through `mapper`, explaining a mismatch in the trainer's terms.
void load_base(const fs::path& base, const ms::ModelStateMapper& mapper, trainer::Gpt& model,
               const c10::Device& device) {
  try {
    ms::load_model_state(base.string(), mapper, *model, quiet_load(device));
  } catch (const ms::StateLoadError& e) {
    throw std::runtime_error(std::string(e.what()) + "\nThe base checkpoint " + base.string() +
                             " was made for another task or model config; delete it (it is pretrained again) or "
                             "set base_checkpoint to another path.");
  }
}

/// --nproc N without a launcher: start this program again as ranks 0 .. N-1
/// (each with the same arguments and torchrun's environment) and wait for them.
int launch_ranks(int argc, char** argv, int64_t nproc) {
  std::vector<std::string> args{"/proc/self/exe"};
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
  std::printf("d9d-peft-train: starting %lld ranks on this machine; rank 0 reports\n", static_cast<long long>(nproc));
  std::fflush(stdout);
  const dist::LaunchResult result = dist::launch_local(args, nproc);
  bool all_interrupted = true;  // Ctrl-C: every rank stopped after the same step, rank 0 saved
  for (const auto& r : result.ranks) all_interrupted = all_interrupted && r.signal == 0 && r.exit_code == 130;
  if (result.exit_code() != 0 && !all_interrupted) {
    std::fprintf(stderr, "d9d-peft-train: the data-parallel run failed:\n%s", result.describe_failures().c_str());
  }
  return result.exit_code();
}

/// The configs' global batches must split evenly over the ranks.
void check_divisible(const trainer::RunConfig& config, int64_t ranks) {
  for (const auto& [name, optim] : {std::pair<const char*, const trainer::OptimConfig*>{"pretrain", &config.pretrain},
                                    {"finetune", &config.finetune}}) {
    if (optim->steps > 0 && optim->batch_size % ranks != 0) {
      throw std::runtime_error(strf("%s.batch_size is %lld, which %lld ranks cannot share evenly: it is the global "
                                    "batch, split across the ranks; make it a multiple of %lld",
                                    name, static_cast<long long>(optim->batch_size), static_cast<long long>(ranks),
                                    static_cast<long long>(ranks)));
    }
  }
}

/// Data-parallel: `loss` averaged over the ranks, and whether any rank was
/// asked to stop (Ctrl-C reaches the ranks at slightly different moments).
std::pair<double, bool> agree(dist::ProcessGroup& group, double loss, bool stop) {
  at::Tensor t = at::tensor({loss / static_cast<double>(group.size()), stop ? 1.0 : 0.0}, at::kDouble);
  group.all_reduce_sum(t).wait();
  return {t[0].item<double>(), t[1].item<double>() > 0};
}

int run(int argc, char** argv) {
  const auto wall_start = Clock::now();
  const Args args = parse_args(argc, argv);
  if (args.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  trainer::RunConfig config = args.config ? trainer::load_run_config(*args.config) : trainer::default_config();
  if (args.device) config.device = *args.device;
  if (args.steps) config.finetune.steps = *args.steps;
  trainer::validate(config);
  if (args.print_config) {
    std::cout << trainer::to_json(config).dump(2) << "\n";
    return 0;
  }

  c10::Device device(config.device);
  if (device.is_cuda() && !torch::cuda::is_available()) {
    throw std::runtime_error("--device " + config.device +
                             ": CUDA is not available (this LibTorch has no CUDA, or no GPU is visible); use cpu");
  }

  // Data-parallel: launch the ranks, or be one of them.
  const auto launched = dist::LaunchEnv::from_environment();
  if (args.nproc && launched && launched->world_size != *args.nproc) {
    throw UsageError(strf("--nproc %lld, but this process was launched as rank %lld of WORLD_SIZE=%lld; leave out "
                          "--nproc under torchrun or another launcher",
                          static_cast<long long>(*args.nproc), static_cast<long long>(launched->rank),
                          static_cast<long long>(launched->world_size)));
  }
  if (args.nproc || launched) check_divisible(config, launched ? launched->world_size : *args.nproc);
  if (args.nproc && !launched) return launch_ranks(argc, argv, *args.nproc);
  std::optional<dist::ProcessGroup> group;
  if (launched) {
    group = dist::init_process_group(*launched, dist::ProcessGroupOptions().device(device));
    device = group->device();  // cuda -> cuda:LOCAL_RANK
    g_rank = group->rank();
  }
  const bool primary = !group || group->rank() == 0;
  // Only rank 0 reports and writes; the others keep stderr for their errors.
  if (!primary && std::freopen("/dev/null", "w", stdout) == nullptr) {
    throw std::runtime_error("cannot silence stdout on a rank other than 0");
  }
  const fs::path out = args.out ? fs::path(*args.out) : fs::path("runs") / config.name;
  const fs::path base_path = config.base_checkpoint.empty() ? out / "base" : fs::path(config.base_checkpoint);
  const nlohmann::ordered_json config_json = trainer::to_json(config);

  // A run killed while it replaced its training checkpoint left the old or the
  // new one complete, and a directory beside it: keep the complete one.
  std::optional<std::string> recovered;
  if (primary) recovered = trainer::recover_checkpoint(out);
  if (group) group->barrier();  // the others read the checkpoint once rank 0 has recovered it
  // Resuming: the checkpoint must be there and fit this run, checked before a
  // file is touched.
  std::optional<trainer::Checkpoint> resumed;
  if (args.resume) {
    resumed = trainer::read_checkpoint(out);
    // Only fields that change no computed number may differ from the saved
    // config: how far to train, when to save, how often to print.
    nlohmann::ordered_json saved = resumed->config;
    saved["finetune"]["steps"] = config_json["finetune"]["steps"];
    saved["finetune"]["save_every"] = config_json["finetune"]["save_every"];
    saved["log_every"] = config_json["log_every"];
    if (const auto d = trainer::first_difference(saved, config_json)) {
      throw std::runtime_error(
          "--resume: " + d->path + " is " + d->now + " in this run's config but " + d->saved +
          " in the one the checkpoint was saved with (" + (trainer::checkpoint_dir(out) / "trainer_state.json").string() +
          ", under \"config\"). A resumed run must use that config; only finetune.steps (--steps), "
          "finetune.save_every and log_every may change. Pass the same --config (and --device) as the stopped run, "
          "or run without --resume to start fine-tuning over.");
    }
    if (!checkpoint_exists(base_path)) {
      throw std::runtime_error("--resume: the base checkpoint " + base_path.string() +
                               " is missing; a resumed run continues on the base it was fine-tuning and never "
                               "pretrains. Put that base back, or run without --resume to start over.");
    }
  }
  if (primary) fs::create_directories(out);
  std::signal(SIGINT, on_sigint);
  if (config.threads > 0) at::set_num_threads(static_cast<int>(config.threads));
  const trainer::GptConfig model_config = gpt_config(config);
  trainer::TrainOptions options;
  options.device = device;
  options.seed = config.seed;
  options.log_every = config.log_every;
  options.stop = &g_stop;
  options.primary = primary;
  if (group) {
    options.shard_index = group->rank();
    options.shard_count = group->size();
    options.agree = [&](double loss, bool stop) { return agree(*group, loss, stop); };
  }

  std::printf("d9d-peft-train: run \"%s\" on %s, writing to %s\n", config.name.c_str(),
              group ? strf("%lld ranks (%s; rank 0 on %s)", static_cast<long long>(group->size()),
                           group->backend().c_str(), device.str().c_str())
                          .c_str()
                    : device.str().c_str(),
              out.string().c_str());
  if (recovered) std::printf("%s\n", recovered->c_str());
  std::fflush(stdout);

  // 1. The base model: pretrained on task A once, then reused.
  torch::manual_seed(config.seed);
  std::optional<trainer::TrainResult> pretrained;
  bool base_exists = checkpoint_exists(base_path);
  if (group) {  // rank 0's view decides, so that all ranks pretrain or none does
    at::Tensor flag = at::tensor({base_exists ? 1.0 : 0.0}, at::kDouble);
    group->broadcast(flag, 0).wait();
    base_exists = flag.item<double>() > 0;
  }
  if (resumed) {
    std::printf("base: reusing %s (resuming fine-tuning)\n", base_path.string().c_str());
  } else if (base_exists) {
    std::printf("base: reusing %s (delete it to pretrain again)\n", base_path.string().c_str());
  } else {
    std::printf("base: pretraining on task %s, %lld steps\n", trainer::task_label(Task::Copy),
                static_cast<long long>(config.pretrain.steps));
    std::fflush(stdout);
    trainer::Gpt base(model_config);
    base->to(device);
    options.phase = "pretrain";
    std::unique_ptr<dist::DistributedDataParallel> ddp;
    if (group) ddp = std::make_unique<dist::DistributedDataParallel>(*base, *group);
    pretrained = trainer::train(base, base->parameters(), Task::Copy, config.task, config.pretrain, options);
    if (pretrained->interrupted) {
      std::printf("interrupted during pretraining (step %lld of %lld): no base checkpoint was saved\n",
                  static_cast<long long>(pretrained->steps), static_cast<long long>(config.pretrain.steps));
      return 130;
    }
    if (primary) {
      ms::SaveOptions save;
      save.progress = ms::no_progress();
      ms::save_model_state(base_path.string(), *ms::identity_mapper_from_module(*base), *base, save);
      std::printf("base: task A accuracy %.1f%%, saved to %s\n",
                  100 * trainer::accuracy(base, Task::Copy, config.task, device), base_path.string().c_str());
    }
    if (group) group->barrier();  // the others load the base rank 0 has just written
  }

  // 2. A fresh model; inject PEFT before loading, then load the base through the mapper.
  torch::manual_seed(config.seed + 1);  // the adapter's init does not depend on whether the base was reused
  trainer::Gpt model(model_config);
  auto method = peft::peft_method_from_config(config.peft);
  auto mapper = peft::inject_peft_and_freeze(*method, model);
  load_base(base_path, *mapper, model, device);
  const std::map<std::string, std::string> tuned_keys = full_tune_keys(*model, *mapper);
  // The scores before fine-tuning are those of the fresh adapter, resumed or not.
  const double b_before = trainer::accuracy(model, Task::Reverse, config.task, device);
  const double a_before = trainer::accuracy(model, Task::Copy, config.task, device);
  if (resumed) trainer::load_trainable(resumed->trainable_file, *model);
  // Only now that the run is known to fit its base (and its checkpoint) does it
  // replace the previous run's outputs (the base checkpoint is what carries
  // over, and the training checkpoint when resuming): a run that fails its
  // checks leaves them, and run_config.json, as they were.
  if (primary) {
    for (const char* stale : {"adapter", "full_tune", "merged", "summary.json"}) fs::remove_all(out / stale);
    if (!resumed) trainer::remove_checkpoint(out);
    ms::write_file_atomically((out / "run_config.json").string(), config_json.dump(2) + "\n");
  }
  const auto trainable = peft::trainable_parameters(*model);
  const int64_t n_trainable = count(trainable), n_total = count(model->parameters());
  std::printf("peft: %s, training %s of %s parameters\n", peft::dump_peft_config(config.peft).c_str(),
              thousands(n_trainable).c_str(), thousands(n_total).c_str());

  // 3. Fine-tune on task B.
  // A training checkpoint every save_every steps, when stopped early, and after
  // the last step of a run that uses them, so that it is never behind the adapter.
  const fs::path checkpoint = trainer::checkpoint_dir(out);
  std::printf("finetune: task %s, %lld steps%s\n", trainer::task_label(Task::Reverse),
              static_cast<long long>(config.finetune.steps),
              resumed ? strf(", resuming after step %lld from %s", static_cast<long long>(resumed->state.step),
                             checkpoint.string().c_str())
                            .c_str()
                      : "");
  std::fflush(stdout);
  options.phase = "finetune";
  options.save_every = config.finetune.save_every;
  options.save_at_end = config.finetune.save_every > 0 || resumed.has_value();
  options.stop_after = args.stop_after_step.value_or(0);
  options.resume = resumed ? &resumed->state : nullptr;
  options.save_checkpoint = [&](const trainer::TrainingState& state) {
    trainer::save_checkpoint(out, *model, state, config_json);
    return checkpoint.string();
  };
  std::unique_ptr<dist::DistributedDataParallel> ddp;
  if (group) ddp = std::make_unique<dist::DistributedDataParallel>(*model, *group);
  const trainer::TrainResult tuned = trainer::train(model, trainable, Task::Reverse, config.task, config.finetune, options);
  // Rank 0 holds what every rank holds: it alone saves, scores, merges and reports.
  if (!primary) return tuned.interrupted ? 130 : 0;

  // 4. The adapter, in Hugging Face PEFT format (LoRA layers only; with LoRA on
  // grouped experts, the trainer's form), and the weights full_tune trained,
  // under the base checkpoint's keys.
  const fs::path adapter_dir = out / "adapter";
  const fs::path full_tune_file = out / "full_tune" / "model.safetensors";
  const bool has_lora = !peft::adapter_names(*model).empty();
  const bool has_full_tune = !tuned_keys.empty();
  // LoRA on grouped experts has no Hugging Face PEFT form (hf::save_adapter
  // refuses it): such an adapter is saved in the trainer's form instead.
  const std::vector<std::string> grouped_lora = grouped_lora_layers(*model);
  const bool hf_adapter = has_lora && grouped_lora.empty();
  if (hf_adapter) {
    peft::hf::SaveAdapterOptions save;
    save.base_model_name_or_path = base_path.string();
    peft::hf::save_adapter(*model, adapter_dir.string(), save);
  } else if (has_lora) {
    save_d9d_adapter(*model, config.peft, adapter_dir);
  }
  if (has_full_tune) save_full_tune(*model, tuned_keys, full_tune_file);
  if (tuned.interrupted || tuned.stopped) {
    std::string saved;
    if (has_lora) saved = "adapter saved to " + adapter_dir.string();
    if (has_full_tune) saved += (saved.empty() ? "" : ", ") + ("full_tune weights saved to " + full_tune_file.string());
    if (fs::exists(checkpoint)) saved += (saved.empty() ? "" : ", ") + ("training checkpoint in " + checkpoint.string());
    std::printf("%s fine-tuning step %lld of %lld: %s; merge and export skipped\n",
                tuned.interrupted ? "interrupted after" : tuned.steps > tuned.first_step ? "stopped after" : "stopped at",
                static_cast<long long>(tuned.steps), static_cast<long long>(config.finetune.steps), saved.c_str());
    std::printf("continue with --resume: %s\n", continue_command(argc, argv).c_str());
    return tuned.interrupted ? 130 : 0;
  }
  const double b_after = trainer::accuracy(model, Task::Reverse, config.task, device);
  const double a_after = trainer::accuracy(model, Task::Copy, config.task, device);
  const at::Tensor probe = trainer::heldout_set(Task::Reverse, config.task).inputs.to(device);
  // The load balance: tokens each expert gets on the held-out task B set.
  const std::vector<trainer::MoeMlpImpl*> moe = moe_blocks(model);
  for (auto* block : moe) block->routed.zero_();
  const at::Tensor tuned_logits = trainer::answer_logits(model, probe, config.task);
  std::vector<std::vector<int64_t>> routed;
  for (auto* block : moe) {
    const at::Tensor r = block->routed.contiguous();
    routed.emplace_back(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
  }

  // 5. What was saved loads back into a fresh base and computes what the trained
  // model did: the full_tune weights over the base (through the identity, not
  // strict: the other keys keep the base's), then the adapter.
  std::string reload = "skipped: nothing was saved";
  bool reload_ok = true;
  std::optional<double> reload_diff;
  if (has_lora && !hf_adapter) {
    // The trainer's form: inject the saved config into a fresh model, load the
    // base through its mapper, then every saved trainable tensor (strictly).
    trainer::Gpt fresh(model_config);
    const fs::path config_file = adapter_dir / kD9dAdapterConfig;
    std::ifstream in(config_file);
    peft::AnyPeftConfig saved_config;
    try {
      saved_config = nlohmann::json::parse(in).get<peft::AnyPeftConfig>();
    } catch (const std::exception& e) {
      throw std::runtime_error(config_file.string() + ": not a d9d PEFT config: " + e.what());
    }
    auto saved_method = peft::peft_method_from_config(saved_config);
    auto fresh_mapper = peft::inject_peft_and_freeze(*saved_method, fresh);
    load_base(base_path, *fresh_mapper, fresh, device);
    trainer::load_trainable(adapter_dir / kD9dAdapterTensors, *fresh);
    reload_diff = max_abs_diff(trainer::answer_logits(fresh, probe, config.task), tuned_logits);
    reload_ok = *reload_diff <= 1e-4;
    reload = strf("max |diff| %.1e: %s", *reload_diff, reload_ok ? "ok" : "FAILED (> 1e-4)");
  } else if (has_lora || has_full_tune) {
    trainer::Gpt fresh(model_config);
    load_base(base_path, *ms::identity_mapper_from_module(*fresh), fresh, device);
    if (has_full_tune) {
      ms::LoadOptions overlay = quiet_load(device);
      overlay.strict = false;
      const ms::LoadReport report =
          ms::load_model_state(full_tune_file.string(), *ms::identity_mapper_from_module(*fresh), *fresh, overlay);
      if (report.loaded_keys.size() != tuned_keys.size() || !report.unexpected_keys.empty() ||
          !report.mismatched_keys.empty()) {
        throw std::runtime_error("the full_tune weights in " + full_tune_file.string() +
                                 " do not load back onto the base model:\n" + report.to_string());
      }
    }
    if (has_lora) peft::hf::load_adapter(*fresh, adapter_dir.string());
    reload_diff = max_abs_diff(trainer::answer_logits(fresh, probe, config.task), tuned_logits);
    reload_ok = *reload_diff <= 1e-4;
    reload = strf("max |diff| %.1e: %s", *reload_diff, reload_ok ? "ok" : "FAILED (> 1e-4)");
  }

  // 6. Merge, check, export.
  peft::merge_peft(*method, model);
  const double merge_diff = max_abs_diff(trainer::answer_logits(model, probe, config.task), tuned_logits);
  const bool merge_ok = merge_diff <= 1e-4;
  const fs::path merged_dir = out / "merged";
  ms::SaveOptions save;
  save.progress = ms::no_progress();
  ms::save_model_state(merged_dir.string(), *ms::identity_mapper_from_module(*model), *model, save);

  // 7. The summary.
  const double wall = seconds_since(wall_start);
  const uint64_t rss = peak_rss_bytes();
  const auto cuda_peak = peak_cuda_bytes(device);
  const double chance = 1.0 / static_cast<double>(config.task.symbols);
  auto row = [](const std::string& label, const std::string& value) {
    std::printf("  %-26s %s\n", label.c_str(), value.c_str());
  };
  std::printf("\nsummary (run \"%s\", %s)\n", config.name.c_str(), device.str().c_str());
  row("", "  before    after");
  row(strf("task %s accuracy", trainer::task_label(Task::Reverse)),
      strf("%6.1f%%  %6.1f%%   (chance %.1f%%)", 100 * b_before, 100 * b_after, 100 * chance));
  row(strf("task %s accuracy", trainer::task_label(Task::Copy)),
      strf("%6.1f%%  %6.1f%%   (forgetting %.1f points)", 100 * a_before, 100 * a_after, 100 * (a_before - a_after)));
  row("trainable parameters", strf("%s of %s (%.2f%%)", thousands(n_trainable).c_str(), thousands(n_total).c_str(),
                                  100.0 * static_cast<double>(n_trainable) / static_cast<double>(n_total)));
  row("pretraining", pretrained ? strf("%lld steps, %.1f s", static_cast<long long>(pretrained->steps),
                                      pretrained->seconds)
                                : std::string("skipped (base reused)"));
  const std::string resumed_note =
      resumed ? strf(" (%lld in this run, resumed after step %lld)", static_cast<long long>(tuned.steps - tuned.first_step),
                     static_cast<long long>(tuned.first_step))
              : std::string();
  row("fine-tuning", strf("%lld steps%s, %.1f s, %.1fk tokens/s, final loss %.4f", static_cast<long long>(tuned.steps),
                         resumed_note.c_str(), tuned.seconds,
                         tuned.seconds > 0 ? tuned.tokens / tuned.seconds / 1000.0 : 0.0, tuned.final_loss));
  if (ddp) {
    const auto& stats = ddp->stats();
    row("data parallel", strf("%lld ranks (%s), %s all-reduced per step (the trainable parameters) in %lld "
                              "bucket%s, %.1f%% of fine-tuning time waiting on it",
                              static_cast<long long>(group->size()), group->backend().c_str(),
                              kib(ddp->trainable_bytes()).c_str(),
                              static_cast<long long>(ddp->bucket_count()), ddp->bucket_count() > 1 ? "s" : "",
                              tuned.seconds > 0 ? 100.0 * stats.total_wait_seconds / tuned.seconds : 0.0));
  }
  if (!moe.empty()) {
    std::string load;
    for (size_t i = 0; i < routed.size(); ++i) {
      const auto [lo, hi] = std::minmax_element(routed[i].begin(), routed[i].end());
      load += strf("%slayer %zu %lld to %lld", i ? ", " : "", i, static_cast<long long>(*lo), static_cast<long long>(*hi));
    }
    const int64_t slots = probe.numel() * config.model.moe->top_k;
    row("mixture of experts", strf("%lld experts per block, top %lld; tokens per expert on held-out task B: %s (even "
                                   "%lld)",
                                   static_cast<long long>(config.model.moe->experts),
                                   static_cast<long long>(config.model.moe->top_k), load.c_str(),
                                   static_cast<long long>(slots / config.model.moe->experts)));
  }
  row("wall time", strf("%.1f s", wall));
  row("peak memory", cuda_peak ? strf("%s on %s (max allocated), %s host (VmHWM)", mib(*cuda_peak).c_str(),
                                     device.str().c_str(), mib(rss).c_str())
                               : mib(rss) + " (VmHWM)");
  row("merged vs unmerged", strf("max |diff| %.1e: %s", merge_diff, merge_ok ? "ok" : "FAILED (> 1e-4)"));
  row(has_lora ? "adapter reload" : "full_tune reload", reload);
  row("adapter", !has_lora    ? std::string("(none: no LoRA layer, so no Hugging Face adapter)")
                 : hf_adapter ? adapter_dir.string()
                              : strf("%s (d9d form: %s and %s; LoRA on grouped experts, e.g. %s, has no Hugging "
                                     "Face PEFT form)",
                                     adapter_dir.string().c_str(), kD9dAdapterTensors, kD9dAdapterConfig,
                                     grouped_lora.front().c_str()));
  if (has_full_tune) {
    row("full_tune weights",
        full_tune_file.string() + " (" + std::to_string(tuned_keys.size()) + " tensors, the base's keys)");
  }
  row("merged checkpoint", merged_dir.string());
  if (fs::exists(checkpoint)) row("training checkpoint", strf("%s (step %lld)", checkpoint.string().c_str(),
                                                               static_cast<long long>(tuned.steps)));

  nlohmann::ordered_json summary = {
      {"task_b_accuracy_before", b_before}, {"task_b_accuracy_after", b_after},
      {"task_a_accuracy_before", a_before}, {"task_a_accuracy_after", a_after},
      {"trainable_parameters", n_trainable}, {"total_parameters", n_total},
      {"pretrain_seconds", pretrained ? pretrained->seconds : 0.0},
      {"finetune_steps", tuned.steps},
      {"finetune_resumed_after_step",
       resumed ? nlohmann::ordered_json(tuned.first_step) : nlohmann::ordered_json(nullptr)},
      {"finetune_final_loss", tuned.final_loss}, {"finetune_seconds", tuned.seconds},
      {"finetune_tokens_per_second", tuned.seconds > 0 ? tuned.tokens / tuned.seconds : 0.0},
      {"ranks", group ? group->size() : 1},
      {"bytes_all_reduced_per_step", ddp ? nlohmann::ordered_json(ddp->stats().last_bytes_all_reduced)
                                         : nlohmann::ordered_json(nullptr)},
      {"communication_wait_fraction",
       ddp && tuned.seconds > 0 ? nlohmann::ordered_json(ddp->stats().total_wait_seconds / tuned.seconds)
                                : nlohmann::ordered_json(nullptr)},
      {"wall_seconds", wall}, {"peak_rss_bytes", rss},
      {"peak_cuda_bytes", cuda_peak ? nlohmann::ordered_json(*cuda_peak) : nlohmann::ordered_json(nullptr)},
      {"merge_max_abs_diff", merge_diff},
      {"reload_max_abs_diff", reload_diff ? nlohmann::ordered_json(*reload_diff) : nlohmann::ordered_json(nullptr)},
      {"adapter", has_lora ? nlohmann::ordered_json(adapter_dir.string()) : nlohmann::ordered_json(nullptr)},
      {"adapter_format", !has_lora ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(hf_adapter ? "hf_peft" : "d9d")},
      {"moe", moe.empty() ? nlohmann::ordered_json(nullptr)
                          : nlohmann::ordered_json{{"experts", config.model.moe->experts},
                                                   {"top_k", config.model.moe->top_k},
                                                   {"routed_tokens_per_expert", routed}}},
      {"full_tune_weights",
       has_full_tune ? nlohmann::ordered_json(full_tune_file.string()) : nlohmann::ordered_json(nullptr)},
      {"ok", merge_ok && reload_ok}};
  ms::write_file_atomically((out / "summary.json").string(), summary.dump(2) + "\n");

  if (!merge_ok || !reload_ok) {
    std::printf("result: FAILED (merged or reloaded outputs differ from the trained model's)\n");
    return 1;
  }
  std::printf("result: OK\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // In a data-parallel run every rank may fail: say which one speaks.
  auto who = [] { return g_rank >= 0 ? "d9d-peft-train: rank " + std::to_string(g_rank) : std::string("d9d-peft-train"); };
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s: %s\n\n%s", who().c_str(), e.what(), kUsage);
    return 2;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", who().c_str(), e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", who().c_str(), e.what());
    return 1;
  }
}
