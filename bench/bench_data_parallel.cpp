// Data-parallel fine-tuning throughput (include/d9d/distributed): the example
// trainer's GPT (examples/trainer/gpt.h) with the trainer's default PEFT
// config (LoRA r 8 on every projection and the position embedding, from
// trainer::default_config()), base frozen, AdamW on the trainable parameters,
// gradients clipped as the trainer clips them. Each configuration runs in
// fresh processes started by d9d::distributed::launch_local (this binary again,
// with --worker), one intra-op thread per rank:
//
//   plain  1 process, no process group, no DistributedDataParallel: the baseline
//   ddp    N processes (N = 1 shows the helper's own cost), Gloo on the loopback
//
// The global batch is fixed and each of N ranks takes 1/N of it (strong
// scaling). Sizes:
//   default  the trainer's default model (vocab 26, context 16, d 128, 2 layers,
//            4 heads, d_ff 256) and fine-tuning batch: 64 sequences of 16 tokens
//   mid      bench_train_step's mid model (vocab 1024, context 512, d 1024,
//            4 layers, 16 heads, d_ff 4096) and its 512 tokens a step, as
//            2 sequences of 256 tokens so that 2 ranks can take one each
// Inputs are random tokens (the same global batches in every configuration),
// the loss next-token cross-entropy on every position.
//
// A step's time is the slowest rank's: after warm-up the ranks meet at a
// barrier, each times its timed steps back to back, and the reported step time
// is max over ranks of (that rank's wall time / steps). Communication wait is
// DistributedDataParallel::stats().last_wait_seconds summed over the timed
// steps, over those steps' wall time, on rank 0 and on the rank where it is
// largest. "Waited for a core" is the training thread's run-queue time
// (/proc/thread-self/schedstat) over the timed steps: what other processes, or
// the ranks' own Gloo threads, took from it. With --repeats R (default 3) every
// configuration runs R times (configurations interleaved) and the table shows
// medians. Results and their reading: docs/performance.md.
//
//   bench_data_parallel                      # both sizes, 1 and 2 processes: ~2 min on 2 cores
//   bench_data_parallel --threads-baseline   # plus 1 process with 2 threads, no DDP
//   bench_data_parallel --sizes default --steps 2 --warmup 1 --repeats 1   # a smoke run
#include "gpt.h"
#include "run_config.h"

#include <d9d/distributed/data_parallel.h>
#include <d9d/distributed/launch.h>
#include <d9d/distributed/process_group.h>
#include <d9d/peft.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <torch/utils.h>
#include <torch/version.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
namespace dist = d9d::distributed;
namespace peft = d9d::peft;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

struct Size {
  std::string name;
  trainer::GptConfig gpt;
  int64_t global_batch;  // sequences a step, over all ranks
  int64_t tokens;        // per sequence
  std::string describe;
};

Size size_named(const std::string& name) {
  if (name == "default") {
    // The trainer's default run: task symbols 24 + 2 markers, length 8 -> context 16.
    const trainer::RunConfig config = trainer::default_config();
    const int64_t vocab = config.task.symbols + 2, context = 2 * config.task.length;
    Size s{name,
           {vocab, context, config.model.d_model, config.model.n_layers, config.model.n_heads, config.model.d_ff},
           config.finetune.batch_size,
           context,
           ""};
    s.describe = fmt::format("d {}, {} layers, {} x {} tokens", s.gpt.d_model, s.gpt.n_layers, s.global_batch, s.tokens);
    return s;
  }
  if (name == "mid") {
    Size s{name, {1024, 512, 1024, 4, 16, 4096}, 2, 256, ""};
    s.describe = fmt::format("d {}, {} layers, {} x {} tokens", s.gpt.d_model, s.gpt.n_layers, s.global_batch, s.tokens);
    return s;
  }
  throw std::invalid_argument("unknown size '" + name + "': expected default or mid");
}

// ---------------------------------------------------------------- a rank

struct WorkerArgs {
  std::string size = "default";
  std::string mode = "ddp";  // plain | ddp
  int64_t warmup = 5, steps = 50;
  int64_t threads = 1;
  double bucket_mb = 25.0;
  std::string out;
};

constexpr int64_t kDistinctBatches = 4;

/// This thread's seconds on a core and seconds runnable but waiting for one
/// (/proc/thread-self/schedstat); zeros where the kernel does not say.
std::pair<double, double> scheduler_seconds() {
  unsigned long long on_cpu = 0, waiting = 0;
  if (FILE* f = std::fopen("/proc/thread-self/schedstat", "r")) {
    if (std::fscanf(f, "%llu %llu", &on_cpu, &waiting) != 2) on_cpu = waiting = 0;
    std::fclose(f);
  }
  return {1e-9 * static_cast<double>(on_cpu), 1e-9 * static_cast<double>(waiting)};
}

int run_worker(const WorkerArgs& a) {
  at::set_num_threads(static_cast<int>(a.threads));
  const Size size = size_named(a.size);
  const trainer::RunConfig config = trainer::default_config();

  std::optional<dist::ProcessGroup> group;
  int64_t rank = 0, world = 1;
  if (a.mode == "ddp") {
    group = dist::init_process_group();
    rank = group->rank();
    world = group->size();
  } else if (a.mode != "plain") {
    throw std::invalid_argument("--mode: expected plain or ddp");
  }
  if (size.global_batch % world != 0) {
    throw std::invalid_argument(fmt::format("the global batch of {} sequences does not split over {} ranks",
                                            size.global_batch, world));
  }
  const int64_t shard = size.global_batch / world;

  torch::manual_seed(0);  // the frozen base: the same on every rank, as if loaded from one checkpoint
  trainer::Gpt model(size.gpt);
  torch::manual_seed(1);
  auto method = peft::peft_method_from_config(config.peft);
  peft::inject_peft_and_freeze(*method, model);
  model->train();
  const std::vector<at::Tensor> trainable = peft::trainable_parameters(*model);
  int64_t trainable_count = 0, total_count = 0, trainable_bytes = 0;
  for (const auto& p : model->parameters()) {
    total_count += p.numel();
    if (p.requires_grad()) {
      trainable_count += p.numel();
      trainable_bytes += p.numel() * static_cast<int64_t>(p.element_size());
    }
  }

  std::unique_ptr<dist::DistributedDataParallel> ddp;
  if (group) {
    ddp = std::make_unique<dist::DistributedDataParallel>(
        *model, *group, dist::DistributedDataParallelOptions().bucket_cap_mb(a.bucket_mb));
  }
  torch::optim::AdamW optimizer(
      trainable, torch::optim::AdamWOptions(config.finetune.lr).weight_decay(config.finetune.weight_decay));

  // The same global batches everywhere; this rank's rows of them.
  std::vector<std::pair<at::Tensor, at::Tensor>> batches;
  for (int64_t i = 0; i < kDistinctBatches; ++i) {
    at::Generator g = at::detail::createCPUGenerator(static_cast<uint64_t>(1000 + i));
    const at::Tensor ids = at::randint(size.gpt.vocab, {size.global_batch, size.tokens + 1}, g, at::kLong)
                               .slice(0, rank * shard, (rank + 1) * shard);
    batches.emplace_back(ids.slice(1, 0, size.tokens).contiguous(), ids.slice(1, 1).reshape({-1}).contiguous());
  }
  auto step = [&](int64_t i) {
    const auto& [inputs, targets] = batches[static_cast<size_t>(i % kDistinctBatches)];
    optimizer.zero_grad();
    const at::Tensor logits = model->forward(inputs);
    at::cross_entropy_loss(logits.reshape({-1, size.gpt.vocab}), targets).backward();
    if (config.finetune.max_grad_norm > 0) torch::nn::utils::clip_grad_norm_(trainable, config.finetune.max_grad_norm);
    optimizer.step();
  };

  for (int64_t i = 0; i < a.warmup; ++i) step(i);
  if (group) group->barrier();
  std::vector<double> step_seconds, wait_seconds;
  const auto sched_start = scheduler_seconds();
  const auto start = Clock::now();
  for (int64_t i = 0; i < a.steps; ++i) {
    const auto t = Clock::now();
    step(a.warmup + i);
    step_seconds.push_back(std::chrono::duration<double>(Clock::now() - t).count());
    wait_seconds.push_back(ddp ? ddp->stats().last_wait_seconds : 0.0);
  }
  const double total = std::chrono::duration<double>(Clock::now() - start).count();
  // The training thread (backward runs on it too on the CPU): how much of the
  // timed steps it spent runnable but without a core, i.e. crowded out by
  // other processes or by this rank's own communication threads.
  const auto sched_end = scheduler_seconds();
  const double crowded_fraction = (sched_end.second - sched_start.second) / total;
  double wait_sum = 0, step_sum = 0;
  for (size_t i = 0; i < step_seconds.size(); ++i) {
    wait_sum += wait_seconds[i];
    step_sum += step_seconds[i];
  }
  const double wait_fraction = step_sum > 0 ? wait_sum / step_sum : 0.0;

  // Over the ranks: the slowest rank's time, and the largest wait fraction;
  // per step, the slowest rank's step.
  double total_max = total, wait_fraction_max = wait_fraction, crowded_max = crowded_fraction;
  std::vector<double> step_max = step_seconds;
  if (group) {
    at::Tensor scalars = at::tensor(std::vector<double>{total, wait_fraction, crowded_fraction}, at::kDouble);
    group->all_reduce_max(scalars);
    total_max = scalars[0].item<double>();
    wait_fraction_max = scalars[1].item<double>();
    crowded_max = scalars[2].item<double>();
    at::Tensor per_step = at::tensor(step_seconds, at::kDouble);
    group->all_reduce_max(per_step);
    step_max.assign(per_step.data_ptr<double>(), per_step.data_ptr<double>() + per_step.numel());
  }
  // The collective alone: one all-reduce of the step's bytes, ranks in step
  // (after a barrier each time), median of 20: what a step would wait with no
  // skew between the ranks and no overlap with backward.
  double all_reduce_alone = 0;
  if (ddp) {
    at::Tensor buffer = at::zeros({ddp->trainable_bytes() / 4}, at::kFloat);
    std::vector<double> times;
    for (int i = 0; i < 20; ++i) {
      group->barrier();
      const auto t = Clock::now();
      group->all_reduce_sum(buffer).wait();
      times.push_back(std::chrono::duration<double>(Clock::now() - t).count());
    }
    std::sort(times.begin(), times.end());
    all_reduce_alone = times[times.size() / 2];
  }
  if (rank == 0) {
    json r;
    r["size"] = size.name;
    r["mode"] = a.mode;
    r["nproc"] = world;
    r["threads_per_rank"] = a.threads;
    r["global_tokens_per_step"] = size.global_batch * size.tokens;
    r["sequences_per_rank"] = shard;
    r["warmup"] = a.warmup;
    r["steps"] = a.steps;
    r["seconds_slowest_rank"] = total_max;
    r["seconds_rank0"] = total;
    r["step_seconds"] = total_max / static_cast<double>(a.steps);
    r["step_seconds_per_step_max"] = step_max;
    r["wait_fraction_rank0"] = wait_fraction;
    r["wait_fraction_max"] = wait_fraction_max;
    r["bytes_all_reduced_per_step"] = ddp ? ddp->stats().last_bytes_all_reduced : 0;
    r["collectives_per_step"] = ddp ? ddp->stats().last_collectives : 0;
    r["all_reduce_alone_seconds"] = all_reduce_alone;
    r["crowded_fraction_max"] = crowded_max;
    r["trainable_parameters"] = trainable_count;
    r["trainable_bytes"] = trainable_bytes;
    r["total_parameters"] = total_count;
    std::ofstream(a.out) << r.dump(2) << "\n";
  }
  return 0;
}

// ---------------------------------------------------------------- the launcher

struct Options {
  std::vector<std::string> sizes{"default", "mid"};
  std::vector<int64_t> nprocs{1, 2};
  bool ddp1 = true;
  bool threads_baseline = false;
  std::map<std::string, int64_t> warmup{{"default", 10}, {"mid", 2}};
  std::map<std::string, int64_t> steps{{"default", 100}, {"mid", 5}};
  int64_t repeats = 3;
  int64_t threads = 1;
  double bucket_mb = 25.0;
  std::string json_path;
};

[[noreturn]] void usage(const std::string& error) {
  std::fprintf(stderr,
               "%s\nusage: bench_data_parallel [--sizes default,mid] [--nproc 1,2] [--no-ddp1] [--threads-baseline]\n"
               "         [--steps N] [--warmup N] [--default-steps N] [--default-warmup N] [--mid-steps N]\n"
               "         [--mid-warmup N] [--repeats R] [--threads T] [--bucket-mb MB] [--json FILE]\n"
               "  --nproc      process counts for the DDP rows (1 process always also runs plain)\n"
               "  --no-ddp1    skip the 1-process DDP row (the helper's cost at world size 1)\n"
               "  --threads-baseline  also one plain process with as many threads as the largest\n"
               "               DDP run has ranks x threads (the same cores, used by intra-op threads)\n"
               "  --steps N    timed steps of every size (default: 100 default, 5 mid)\n"
               "  --warmup N   untimed steps first (default: 10 default, 2 mid)\n"
               "  --repeats R  run every configuration R times, interleaved; report medians (default 3)\n"
               "  --threads T  intra-op threads per rank (default 1)\n",
               error.c_str());
  std::exit(2);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

int64_t to_int(const std::string& flag, const std::string& v, int64_t min) {
  size_t used = 0;
  long long n = 0;
  try {
    n = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != v.size() || n < min) usage(flag + " expects an integer >= " + std::to_string(min) + ", got '" + v + "'");
  return n;
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value after " + arg);
      return argv[++i];
    };
    if (arg == "--sizes") {
      o.sizes = split(value());
      for (const auto& s : o.sizes) {
        if (s != "default" && s != "mid") usage("--sizes: unknown size '" + s + "'");
      }
    } else if (arg == "--nproc") {
      o.nprocs.clear();
      for (const auto& n : split(value())) o.nprocs.push_back(to_int("--nproc", n, 1));
    } else if (arg == "--no-ddp1") {
      o.ddp1 = false;
    } else if (arg == "--threads-baseline") {
      o.threads_baseline = true;
    } else if (arg == "--steps") {
      const int64_t n = to_int(arg, value(), 1);
      for (auto& [k, v] : o.steps) v = n;
    } else if (arg == "--warmup") {
      const int64_t n = to_int(arg, value(), 0);
      for (auto& [k, v] : o.warmup) v = n;
    } else if (arg == "--default-steps") o.steps["default"] = to_int(arg, value(), 1);
    else if (arg == "--default-warmup") o.warmup["default"] = to_int(arg, value(), 0);
    else if (arg == "--mid-steps") o.steps["mid"] = to_int(arg, value(), 1);
    else if (arg == "--mid-warmup") o.warmup["mid"] = to_int(arg, value(), 0);
    else if (arg == "--repeats") o.repeats = to_int(arg, value(), 1);
    else if (arg == "--threads") o.threads = to_int(arg, value(), 1);
    else if (arg == "--bucket-mb") {
      const std::string v = value();
      o.bucket_mb = std::atof(v.c_str());
      if (!(o.bucket_mb > 0)) usage("--bucket-mb expects a positive number, got '" + v + "'");
    } else if (arg == "--json") o.json_path = value();
    else if (arg == "-h" || arg == "--help") usage("");
    else usage("unknown argument " + arg);
  }
  if (o.sizes.empty() || o.nprocs.empty()) usage("--sizes and --nproc need at least one entry");
  return o;
}

struct Config {
  std::string size;
  std::string mode;
  int64_t nproc;
  int64_t threads;
};

std::string read_first_line_with(const char* path, const std::string& prefix) {
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(prefix, 0) == 0) {
      const auto colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(colon + 2);
    }
  }
  return "";
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string one, five, fifteen;
  in >> one >> five >> fifteen;
  return one + " " + five + " " + fifteen;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string thousands(double x) {
  const auto n = static_cast<long long>(x + 0.5);
  std::string digits = std::to_string(n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ' ';
    out += digits[i];
  }
  return out;
}

/// A run whose training thread waited for a core longer than this share of
/// its time shared the cores with other work (or with its own Gloo threads).
constexpr double kCrowdedLimit = 0.05;

int run_launcher(const Options& o) {
  const std::string self = fs::canonical("/proc/self/exe").string();
  const fs::path dir = fs::temp_directory_path() / fmt::format("bench_data_parallel.{}", ::getpid());
  fs::create_directories(dir);
  struct Cleanup {
    fs::path dir;
    ~Cleanup() {
      std::error_code ignored;
      fs::remove_all(dir, ignored);
    }
  } cleanup{dir};

  std::vector<Config> configs;
  const int64_t max_nproc = *std::max_element(o.nprocs.begin(), o.nprocs.end());
  for (const auto& size : o.sizes) {
    configs.push_back({size, "plain", 1, o.threads});
    if (o.threads_baseline && max_nproc > 1) configs.push_back({size, "plain", 1, o.threads * max_nproc});
    for (int64_t n : o.nprocs) {
      if (n == 1 && !o.ddp1) continue;
      configs.push_back({size, "ddp", n, o.threads});
    }
  }

  const std::string cpu = read_first_line_with("/proc/cpuinfo", "model name");
  const long cores = ::sysconf(_SC_NPROCESSORS_ONLN);
  const std::string load_before = load_average();
  std::printf("bench_data_parallel: LibTorch %s, %s, %ld cores, %lld intra-op thread(s) per rank, Gloo on the "
              "loopback, bucket cap %g MiB, %lld repeat(s); load average at start %s\n",
              TORCH_VERSION, cpu.empty() ? "unknown CPU" : cpu.c_str(), cores, static_cast<long long>(o.threads),
              o.bucket_mb, static_cast<long long>(o.repeats), load_before.c_str());
  std::fflush(stdout);

  const auto wall_start = Clock::now();
  std::vector<std::vector<json>> runs(configs.size());
  for (int64_t rep = 0; rep < o.repeats; ++rep) {
    for (size_t c = 0; c < configs.size(); ++c) {
      const Config& cfg = configs[c];
      const fs::path out = dir / fmt::format("{}_{}_{}x{}_{}.json", cfg.size, cfg.mode, cfg.nproc, cfg.threads, rep);
      // Besides at::set_num_threads in the rank: OpenMP and the BLAS read these
      // when they load, and a BLAS with its own thread pool (OpenBLAS, under
      // Debian's LibTorch) may not follow at::set_num_threads.
      const std::string threads = std::to_string(cfg.threads);
      for (const char* var : {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"}) {
        ::setenv(var, threads.c_str(), 1);
      }
      const std::vector<std::string> argv{self,      "--worker",
                                          "--size",  cfg.size,
                                          "--mode",  cfg.mode,
                                          "--warmup", std::to_string(o.warmup.at(cfg.size)),
                                          "--steps", std::to_string(o.steps.at(cfg.size)),
                                          "--threads", threads,
                                          "--bucket-mb", fmt::format("{}", o.bucket_mb),
                                          "--out",   out.string()};
      const auto t = Clock::now();
      const dist::LaunchResult result =
          dist::launch_local(argv, cfg.nproc, dist::LocalLaunchOptions().grace(std::chrono::seconds(10)));
      if (result.exit_code() != 0) {
        std::fprintf(stderr, "bench_data_parallel: %s %s x%lld failed:\n%s", cfg.size.c_str(), cfg.mode.c_str(),
                     static_cast<long long>(cfg.nproc), result.describe_failures().c_str());
        return 1;
      }
      std::ifstream in(out);
      json r = json::parse(in);
      std::fprintf(stderr, "  %-7s %-5s %lld x %lld  step %.2f ms  waited for a core %.1f %%  (%.1f s with start-up)\n",
                   cfg.size.c_str(), cfg.mode.c_str(), static_cast<long long>(cfg.nproc),
                   static_cast<long long>(cfg.threads), 1e3 * r["step_seconds"].get<double>(),
                   100 * r["crowded_fraction_max"].get<double>(), std::chrono::duration<double>(Clock::now() - t).count());
      runs[c].push_back(std::move(r));
    }
  }
  const double wall = std::chrono::duration<double>(Clock::now() - wall_start).count();

  // Medians over the repeats; speed-up against the plain process of the same size.
  std::map<std::string, double> plain_step;
  std::vector<json> rows;
  int64_t crowded_runs = 0;
  for (size_t c = 0; c < configs.size(); ++c) {
    std::vector<double> step, wait0, waitmax, alone, crowded;
    for (const auto& r : runs[c]) {
      crowded.push_back(r["crowded_fraction_max"].get<double>());
      if (r["crowded_fraction_max"].get<double>() > kCrowdedLimit) ++crowded_runs;
      step.push_back(r["step_seconds"].get<double>());
      wait0.push_back(r["wait_fraction_rank0"].get<double>());
      waitmax.push_back(r["wait_fraction_max"].get<double>());
      alone.push_back(r["all_reduce_alone_seconds"].get<double>());
    }
    json row = runs[c].front();
    row.erase("step_seconds_per_step_max");
    row["step_seconds"] = median(step);
    row["step_seconds_runs"] = step;
    row["wait_fraction_rank0"] = median(wait0);
    row["wait_fraction_max"] = median(waitmax);
    row["all_reduce_alone_seconds"] = median(alone);
    row["crowded_fraction_max"] = median(crowded);
    row["crowded_fraction_runs"] = crowded;
    row["global_tokens_per_s"] = row["global_tokens_per_step"].get<double>() / median(step);
    if (configs[c].mode == "plain" && configs[c].threads == o.threads) plain_step[configs[c].size] = median(step);
    rows.push_back(std::move(row));
  }
  for (auto& row : rows) row["speedup_vs_plain"] = plain_step.at(row["size"].get<std::string>()) / row["step_seconds"].get<double>();

  std::printf("\n| size | processes × threads | DDP | sequences per rank | step ms | global tokens/s | speed-up | "
              "comm. wait, rank 0 | comm. wait, max rank | all-reduce alone ms | all-reduced per step | waited for a core |\n");
  std::printf("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const auto& row : rows) {
    const bool ddp = row["mode"] == "ddp";
    const std::string size = row["size"].get<std::string>();
    const int64_t bytes = row["bytes_all_reduced_per_step"].get<int64_t>();
    const std::string dash = "—";
    std::printf("| %s (%s) | %lld × %lld | %s | %lld | %.2f | %s | %.2f× | %s | %s | %s | %s | %.1f %% |\n", size.c_str(),
                size_named(size).describe.c_str(), static_cast<long long>(row["nproc"].get<int64_t>()),
                static_cast<long long>(row["threads_per_rank"].get<int64_t>()), ddp ? "yes" : "no (plain)",
                static_cast<long long>(row["sequences_per_rank"].get<int64_t>()),
                1e3 * row["step_seconds"].get<double>(), thousands(row["global_tokens_per_s"].get<double>()).c_str(),
                row["speedup_vs_plain"].get<double>(),
                (ddp ? fmt::format("{:.1f} %", 100 * row["wait_fraction_rank0"].get<double>()) : dash).c_str(),
                (ddp ? fmt::format("{:.1f} %", 100 * row["wait_fraction_max"].get<double>()) : dash).c_str(),
                (ddp ? fmt::format("{:.2f}", 1e3 * row["all_reduce_alone_seconds"].get<double>()) : dash).c_str(),
                (ddp ? fmt::format("{:.1f} KiB, {} bucket(s)", bytes / 1024.0, row["collectives_per_step"].get<int64_t>())
                     : dash)
                    .c_str(),
                100 * row["crowded_fraction_max"].get<double>());
  }
  std::vector<std::string> trained;
  for (const auto& size : o.sizes) {
    for (const auto& row : rows) {
      if (row["size"] == size) {
        trained.push_back(fmt::format("{} {} of {} parameters", size, thousands(row["trainable_parameters"].get<double>()),
                                      thousands(row["total_parameters"].get<double>())));
        break;
      }
    }
  }
  std::printf("\nstep ms: the slowest rank's wall time over the timed steps (the ranks start them together, after a "
              "barrier) / steps. speed-up: against the plain process with %lld thread(s). Medians of %lld run(s). "
              "Trained (LoRA): %s.\n",
              static_cast<long long>(o.threads), static_cast<long long>(o.repeats),
              fmt::format("{}", fmt::join(trained, ", ")).c_str());
  std::printf("waited for a core: the share of the timed steps the training thread of the most crowded rank was "
              "runnable but had no core (/proc/thread-self/schedstat), median over the runs.\n");
  if (crowded_runs > 0) {
    std::printf("WARNING: in %lld run(s) a rank waited for a core more than %.0f %% of the time. Either other "
                "processes shared the cores (then those numbers understate what the ranks can do: rerun on a quiet "
                "machine), or the ranks' own threads did (Gloo's, when small buckets overlap backward; then it is "
                "part of the result).\n",
                static_cast<long long>(crowded_runs), 100 * kCrowdedLimit);
  }
  const std::string load_after = load_average();
  std::printf("Whole benchmark %.1f s; load average at end %s.\n", wall, load_after.c_str());

  if (!o.json_path.empty()) {
    json doc;
    doc["libtorch"] = TORCH_VERSION;
    doc["cpu"] = cpu;
    doc["cores"] = cores;
    doc["threads_per_rank"] = o.threads;
    doc["bucket_cap_mb"] = o.bucket_mb;
    doc["repeats"] = o.repeats;
    doc["load_average_start"] = load_before;
    doc["load_average_end"] = load_after;
    doc["seconds"] = wall;
    doc["rows"] = rows;
    std::ofstream(o.json_path) << doc.dump(2) << "\n";
  }
  return 0;
}

WorkerArgs parse_worker(int argc, char** argv) {
  WorkerArgs a;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--size") a.size = v;
    else if (k == "--mode") a.mode = v;
    else if (k == "--warmup") a.warmup = std::stoll(v);
    else if (k == "--steps") a.steps = std::stoll(v);
    else if (k == "--threads") a.threads = std::stoll(v);
    else if (k == "--bucket-mb") a.bucket_mb = std::stod(v);
    else if (k == "--out") a.out = v;
    else throw std::invalid_argument("unknown worker argument " + k);
  }
  if (a.out.empty()) throw std::invalid_argument("the worker needs --out");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--worker") {
    try {
      return run_worker(parse_worker(argc, argv));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_data_parallel worker: %s\n", e.what());
      return 3;
    }
  }
  try {
    return run_launcher(parse_options(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_data_parallel: %s\n", e.what());
    return 1;
  }
}
