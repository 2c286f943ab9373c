// Data-parallel training on c10d (include/d9d/distributed): real processes on
// the loopback, started by d9d::distributed::launch_local running this same
// binary as a worker (argv[1] == "--worker"). Each worker trains the toy model
// with a LoRA + full_tune stack on its shard of a global batch and writes what
// it ended with to <dir>/rank<r>.safetensors (or its error to rank<r>.error);
// the tests compare the ranks with each other and with a plain one-process
// run of the same global batch.
#include "../toy_model.h"

#include <d9d/distributed/data_parallel.h>
#include <d9d/distributed/launch.h>
#include <d9d/distributed/process_group.h>
#include <d9d/model_state/io/safetensors.h>
#include <d9d/peft.h>

#include <ATen/ATen.h>
#include <torch/optim/adamw.h>
#include <torch/utils.h>

#include <nlohmann/json.hpp>

#include <gtest/gtest.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

namespace fs = std::filesystem;
namespace dist = d9d::distributed;
namespace ms = d9d::model_state;
namespace peft = d9d::peft;

namespace {

// ---------------------------------------------------------------- the worker

struct WorkerArgs {
  std::string out;
  int64_t steps = 4;
  int64_t global_batch = 8;
  int64_t micro = 1;             // micro-batches per step (all but the last under no_sync)
  double bucket_mb = 0.001;      // small: several buckets
  bool plain = false;            // one process, no process group, no DDP: the reference
  bool seed_by_rank = false;     // adapters start different on every rank
  int64_t lora_r_on_rank1 = 4;   // another r on rank 1: parameters that differ
  int64_t kill_rank = -1, kill_step = -1;
  int64_t timeout_ms = 60000;
};

WorkerArgs parse_worker(int argc, char** argv) {
  WorkerArgs a;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--out") a.out = v;
    else if (k == "--steps") a.steps = std::stoll(v);
    else if (k == "--global-batch") a.global_batch = std::stoll(v);
    else if (k == "--micro") a.micro = std::stoll(v);
    else if (k == "--bucket-mb") a.bucket_mb = std::stod(v);
    else if (k == "--plain") a.plain = v == "1";
    else if (k == "--seed-by-rank") a.seed_by_rank = v == "1";
    else if (k == "--lora-r-on-rank1") a.lora_r_on_rank1 = std::stoll(v);
    else if (k == "--kill-rank") a.kill_rank = std::stoll(v);
    else if (k == "--kill-step") a.kill_step = std::stoll(v);
    else if (k == "--timeout-ms") a.timeout_ms = std::stoll(v);
    else throw std::runtime_error("worker: unknown argument " + k);
  }
  return a;
}

constexpr int64_t kSeq = 6;
const toy::ToyConfig kToyConfig{};

std::string peft_config(int64_t r) {
  return R"j({"kind":"stack","methods":[{"kind":"lora","module_name_pattern":".*(q_proj|v_proj|up_proj)",)j"
         R"j("params":{"r":)j" +
         std::to_string(r) + R"j(,"alpha":8,"dropout":0.0}},{"kind":"full_tune","module_name_pattern":"norm"}]})j";
}

/// The global batch of `step`: the same on every rank (and in the plain run).
at::Tensor global_batch(int64_t step, int64_t rows) {
  at::Generator g = at::detail::createCPUGenerator(static_cast<uint64_t>(1234 + step));
  return at::randint(kToyConfig.vocab, {rows, kSeq}, g, at::kLong);
}

at::Tensor lm_loss(toy::Toy& model, const at::Tensor& ids) {
  const at::Tensor logits = model->forward(ids.slice(1, 0, kSeq - 1));
  return at::cross_entropy_loss(logits.reshape({-1, kToyConfig.vocab}), ids.slice(1, 1, kSeq).reshape({-1}));
}

int run_worker(const WorkerArgs& a) {
  at::set_num_threads(1);
  int64_t rank = 0, world = 1;
  std::optional<dist::ProcessGroup> group;
  if (!a.plain) {
    group = dist::init_process_group(dist::ProcessGroupOptions().timeout(std::chrono::milliseconds(a.timeout_ms)));
    rank = group->rank();
    world = group->size();
  }
  const fs::path out(a.out);
  try {
    torch::manual_seed(7);  // the frozen base: the same everywhere, as if loaded from one checkpoint
    toy::Toy model(kToyConfig);
    torch::manual_seed(a.seed_by_rank ? 100 + rank : 100);
    auto method = peft::peft_method_from_config(peft::parse_peft_config(peft_config(rank == 1 ? a.lora_r_on_rank1 : 4)));
    peft::inject_peft_and_freeze(*method, model);
    std::map<std::string, at::Tensor> frozen;
    for (const auto& p : model->named_parameters()) {
      if (!p.value().requires_grad()) frozen.emplace(p.key(), p.value().detach().clone());
    }

    std::unique_ptr<dist::DistributedDataParallel> ddp;
    if (group) {
      ddp = std::make_unique<dist::DistributedDataParallel>(
          *model, *group, dist::DistributedDataParallelOptions().bucket_cap_mb(a.bucket_mb));
    }
    ms::StateDict saved;
    const auto trainable = peft::trainable_parameters(*model);
    for (const auto& p : model->named_parameters()) {
      if (p.value().requires_grad()) saved.emplace("initial/" + p.key(), p.value().detach().clone());
    }
    torch::optim::AdamW optimizer(trainable, torch::optim::AdamWOptions(1e-2));
    std::vector<std::string> bytes_per_step;
    int64_t early = 0, collectives = 0;
    const int64_t shard = a.global_batch / world;
    for (int64_t step = 0; step < a.steps; ++step) {
      if (step == a.kill_step && rank == a.kill_rank) std::raise(SIGKILL);
      const at::Tensor ids = global_batch(step, a.global_batch).slice(0, rank * shard, (rank + 1) * shard);
      optimizer.zero_grad();
      const int64_t per_micro = shard / a.micro;
      for (int64_t m = 0; m < a.micro; ++m) {
        const at::Tensor part = ids.slice(0, m * per_micro, (m + 1) * per_micro);
        if (ddp && m + 1 < a.micro) {
          auto no_sync = ddp->no_sync();
          (lm_loss(model, part) / static_cast<double>(a.micro)).backward();
        } else {
          (lm_loss(model, part) / static_cast<double>(a.micro)).backward();
        }
      }
      optimizer.step();
      if (ddp) {
        bytes_per_step.push_back(std::to_string(ddp->stats().last_bytes_all_reduced));
        early += ddp->stats().last_collectives_during_backward;
        collectives += ddp->stats().last_collectives;
      }
    }

    bool frozen_unchanged = true;
    for (const auto& p : model->named_parameters()) {
      if (p.value().requires_grad()) {
        saved.emplace("param/" + p.key(), p.value().detach().clone());
      } else {
        frozen_unchanged = frozen_unchanged && p.value().equal(frozen.at(p.key()));
      }
    }
    std::map<std::string, std::string> meta{{"frozen_unchanged", frozen_unchanged ? "1" : "0"}};
    if (ddp) {
      std::string joined;
      for (const auto& b : bytes_per_step) joined += (joined.empty() ? "" : ",") + b;
      meta["bytes_per_step"] = joined;
      meta["trainable_bytes"] = std::to_string(ddp->trainable_bytes());
      meta["buckets"] = std::to_string(ddp->bucket_count());
      meta["collectives"] = std::to_string(collectives);
      meta["collectives_during_backward"] = std::to_string(early);
      meta["synchronized_steps"] = std::to_string(ddp->stats().synchronized_steps);
      int64_t counted = 0;
      for (const auto& t : trainable) counted += t.numel() * static_cast<int64_t>(t.element_size());
      meta["trainable_bytes_counted_here"] = std::to_string(counted);
    }
    ms::save_safetensors((out / ("rank" + std::to_string(rank) + ".safetensors")).string(), saved, meta);
    return 0;
  } catch (const std::exception& e) {
    std::ofstream(out / ("rank" + std::to_string(rank) + ".error")) << e.what();
    return 3;
  }
}

// ---------------------------------------------------------------- the tests

std::string g_self;

struct Job {
  dist::LaunchResult result;
  double seconds = 0;
  fs::path dir;
};

Job launch(const std::string& name, int64_t nproc, std::vector<std::string> args) {
  Job run;
  run.dir = fs::current_path() / "data_parallel_runs" / name;  // under the build tree when ctest runs it
  fs::remove_all(run.dir);
  fs::create_directories(run.dir);
  std::vector<std::string> argv{g_self, "--worker", "--out", run.dir.string()};
  argv.insert(argv.end(), args.begin(), args.end());
  const auto start = std::chrono::steady_clock::now();
  run.result = dist::launch_local(argv, nproc, dist::LocalLaunchOptions().grace(std::chrono::seconds(60)));
  run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return run;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string errors_of(const Job& run) {
  std::string text = run.result.describe_failures();
  for (const auto& e : fs::directory_iterator(run.dir)) {
    if (e.path().extension() == ".error") text += e.path().filename().string() + ": " + read_text(e.path()) + "\n";
  }
  return text;
}

std::shared_ptr<ms::SafetensorsFile> rank_file(const Job& run, int64_t rank) {
  return ms::SafetensorsFile::open((run.dir / ("rank" + std::to_string(rank) + ".safetensors")).string());
}

double max_param_diff(const ms::SafetensorsFile& a, const ms::SafetensorsFile& b) {
  double diff = 0;
  for (const auto& key : a.keys()) {
    if (key.rfind("param/", 0) != 0) continue;
    diff = std::max(diff, (a.get(key) - b.get(key)).abs().max().item<double>());
  }
  return diff;
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw std::runtime_error("no free port");
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

class DataParallel : public ::testing::TestWithParam<int64_t> {};

TEST_P(DataParallel, RanksEndBitwiseIdenticalAndSendOnlyTrainableBytes) {
  const int64_t nproc = GetParam();
  const Job run = launch("identical" + std::to_string(nproc), nproc,
                         {"--steps", "4", "--global-batch", "8", "--seed-by-rank", "1"});
  ASSERT_EQ(run.result.exit_code(), 0) << errors_of(run);
  const auto r0 = rank_file(run, 0);
  const auto& meta0 = r0->header().metadata;
  EXPECT_GT(std::stoll(meta0.at("buckets")), 2) << "the bucket cap should split the adapters";
  // Every step sent exactly the trainable parameters' bytes, as the helper
  // and this test (from the model) count them; frozen ones were never sent.
  EXPECT_EQ(meta0.at("trainable_bytes"), meta0.at("trainable_bytes_counted_here"));
  const std::string b = meta0.at("trainable_bytes");
  EXPECT_EQ(meta0.at("bytes_per_step"), b + "," + b + "," + b + "," + b);
  EXPECT_EQ(meta0.at("synchronized_steps"), "4");
  // One collective per bucket per step, and all but at most the last bucket
  // of each step sent while backward was still computing the others.
  const int64_t buckets = std::stoll(meta0.at("buckets"));
  EXPECT_EQ(std::stoll(meta0.at("collectives")), 4 * buckets);
  EXPECT_GE(std::stoll(meta0.at("collectives_during_backward")), 4 * (buckets - 1));
  size_t params = 0;
  for (int64_t r = 0; r < nproc; ++r) {
    const auto f = rank_file(run, r);
    EXPECT_EQ(f->header().metadata.at("frozen_unchanged"), "1") << "rank " << r;
    for (const auto& key : r0->keys()) {
      // Rank r's adapters started from its own seed; after the broadcast and
      // the same averaged updates they are rank 0's, bit for bit.
      EXPECT_TRUE(f->get(key).equal(r0->get(key))) << "rank " << r << " " << key;
      params += key.rfind("param/", 0) == 0;
      if (key.rfind("param/", 0) == 0) {
        EXPECT_FALSE(f->get(key).equal(f->get("initial/" + key.substr(6)))) << key << " did not train";
      }
    }
  }
  EXPECT_GT(params, 0u);
}

INSTANTIATE_TEST_SUITE_P(Ranks, DataParallel, ::testing::Values(2, 4));

TEST(DataParallelNumbers, TwoRanksEqualOneProcessWithTheDoubleBatch) {
  const Job plain = launch("plain", 1, {"--steps", "4", "--global-batch", "8", "--plain", "1"});
  ASSERT_EQ(plain.result.exit_code(), 0) << errors_of(plain);
  const Job two = launch("two", 2, {"--steps", "4", "--global-batch", "8"});
  ASSERT_EQ(two.result.exit_code(), 0) << errors_of(two);
  const double diff = max_param_diff(*rank_file(two, 0), *rank_file(plain, 0));
  EXPECT_LE(diff, 1e-6);
  // Gradient accumulation: two micro-batches per rank, the first under
  // no_sync, give the same step and one synchronisation per step.
  const Job micro = launch("micro", 2, {"--steps", "4", "--global-batch", "8", "--micro", "2"});
  ASSERT_EQ(micro.result.exit_code(), 0) << errors_of(micro);
  EXPECT_LE(max_param_diff(*rank_file(micro, 0), *rank_file(plain, 0)), 1e-6);
  EXPECT_EQ(rank_file(micro, 0)->header().metadata.at("synchronized_steps"), "4");
}

TEST(DataParallelFailures, AKilledRankEndsTheOthersWithAnErrorNamingIt) {
  const Job run = launch("killed", 2, {"--steps", "50", "--kill-rank", "1", "--kill-step", "2", "--timeout-ms", "60000"});
  EXPECT_EQ(run.result.first_failure, 1) << errors_of(run);
  ASSERT_EQ(run.result.ranks.size(), 2u);
  EXPECT_EQ(run.result.ranks[1].signal, SIGKILL);
  EXPECT_EQ(run.result.ranks[0].exit_code, 3) << errors_of(run);  // ended by its own error, not by the launcher
  EXPECT_FALSE(run.result.ranks[0].stopped_by_launcher);
  EXPECT_LT(run.seconds, 30.0) << "the surviving rank should notice at once, well within the 60 s timeout";
  const std::string error = read_text(run.dir / "rank0.error");
  EXPECT_NE(error.find("rank 0 of 2: all_reduce"), std::string::npos) << error;
  EXPECT_NE(error.find("rank 1 (pid " + std::to_string(run.result.ranks[1].pid) + ") has exited"), std::string::npos)
      << error;
  EXPECT_NE(run.result.describe_failures().find("rank 1 (pid"), std::string::npos);
}

TEST(DataParallelFailures, RanksWithDifferentParametersAreRefusedOnEveryRank) {
  const Job run = launch("mismatch", 2, {"--lora-r-on-rank1", "2"});
  EXPECT_NE(run.result.exit_code(), 0);
  for (int r = 0; r < 2; ++r) {
    const std::string error = read_text(run.dir / ("rank" + std::to_string(r) + ".error"));
    EXPECT_NE(error.find("the ranks hold different trainable parameters"), std::string::npos) << error;
  }
}

TEST(DataParallelFailures, ARankThatNeverJoinsIsNamedWhenTheTimeoutEnds) {
  dist::LaunchEnv env;
  env.rank = 0;
  env.world_size = 3;
  env.master_port = free_port();
  const auto start = std::chrono::steady_clock::now();
  try {
    dist::init_process_group(env, dist::ProcessGroupOptions().timeout(std::chrono::milliseconds(1500)));
    FAIL() << "expected a DistributedError";
  } catch (const dist::DistributedError& e) {
    EXPECT_NE(std::string(e.what()).find("ranks 1, 2 did not join at 127.0.0.1:"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 10.0);
}

/// Sets environment variables for one test and restores them after.
class EnvGuard {
 public:
  explicit EnvGuard(std::map<std::string, std::optional<std::string>> vars) {
    for (const auto& [k, v] : vars) {
      const char* old = std::getenv(k.c_str());
      saved_[k] = old ? std::optional<std::string>(old) : std::nullopt;
      if (v) ::setenv(k.c_str(), v->c_str(), 1);
      else ::unsetenv(k.c_str());
    }
  }
  ~EnvGuard() {
    for (const auto& [k, v] : saved_) {
      if (v) ::setenv(k.c_str(), v->c_str(), 1);
      else ::unsetenv(k.c_str());
    }
  }

 private:
  std::map<std::string, std::optional<std::string>> saved_;
};

std::string env_error(std::map<std::string, std::optional<std::string>> vars) {
  EnvGuard guard(std::move(vars));
  try {
    dist::LaunchEnv::from_environment();
  } catch (const dist::DistributedError& e) {
    return e.what();
  }
  return "";
}

TEST(LaunchEnvironment, ReadsTorchrunsVariablesAndNamesTheBadOne) {
  {
    EnvGuard guard({{"WORLD_SIZE", std::nullopt}});
    EXPECT_FALSE(dist::LaunchEnv::from_environment().has_value());
    EXPECT_THROW(dist::init_process_group(), dist::DistributedError);
  }
  {
    EnvGuard guard({{"WORLD_SIZE", "4"}, {"RANK", "2"}, {"LOCAL_RANK", "0"}, {"MASTER_ADDR", "node0"},
                    {"MASTER_PORT", "29400"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                    {"TORCHELASTIC_RESTART_COUNT", "1"}});
    const auto env = dist::LaunchEnv::from_environment();
    ASSERT_TRUE(env.has_value());
    EXPECT_EQ(env->rank, 2);
    EXPECT_EQ(env->world_size, 4);
    EXPECT_EQ(env->master_addr, "node0");
    EXPECT_EQ(env->master_port, 29400);
    EXPECT_TRUE(env->agent_store);
    EXPECT_EQ(env->restart_count, 1);
  }
  const std::map<std::string, std::optional<std::string>> ok{
      {"WORLD_SIZE", "2"}, {"RANK", "1"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29400"},
      {"TORCHELASTIC_USE_AGENT_STORE", std::nullopt}};
  auto with = [&](const std::string& k, std::optional<std::string> v) {
    auto vars = ok;
    vars[k] = std::move(v);
    return env_error(vars);
  };
  EXPECT_EQ(env_error(ok), "");
  EXPECT_NE(with("RANK", std::nullopt).find("RANK is not"), std::string::npos);
  EXPECT_NE(with("RANK", "2").find("RANK=\"2\": expected an integer in [0, 1]"), std::string::npos);
  EXPECT_NE(with("RANK", "one").find("RANK=\"one\""), std::string::npos);
  EXPECT_NE(with("WORLD_SIZE", "0").find("WORLD_SIZE=\"0\""), std::string::npos);
  EXPECT_NE(with("MASTER_PORT", "70000").find("MASTER_PORT=\"70000\""), std::string::npos);
  EXPECT_NE(with("MASTER_PORT", std::nullopt).find("MASTER_PORT is not set"), std::string::npos);
  EXPECT_NE(with("MASTER_ADDR", std::nullopt).find("MASTER_ADDR is not set"), std::string::npos);
}

TEST(LaunchEnvironment, OptionsAreCheckedBeforeAnythingConnects) {
  dist::LaunchEnv env;
  auto error = [&](const dist::ProcessGroupOptions& o) -> std::string {
    try {
      dist::init_process_group(env, o);
    } catch (const dist::DistributedError& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(error(dist::ProcessGroupOptions().backend("mpi")).find("unknown backend \"mpi\""), std::string::npos);
  EXPECT_NE(error(dist::ProcessGroupOptions().backend("nccl")).find("reduces CUDA tensors"), std::string::npos);
  EXPECT_NE(error(dist::ProcessGroupOptions().timeout(std::chrono::milliseconds(0))).find("timeout must be positive"),
            std::string::npos);
#if D9D_EXPECT_NCCL
  EXPECT_TRUE(dist::nccl_available());
  if (!at::hasCUDA()) {  // CI's build machine: NCCL compiled in, no GPU
    const std::string nccl = error(dist::ProcessGroupOptions().device(c10::Device(c10::kCUDA)));
    EXPECT_NE(nccl.find("needs a CUDA device, and none is visible"), std::string::npos) << nccl;
  }
#else
  const std::string nccl = error(dist::ProcessGroupOptions().device(c10::Device(c10::kCUDA)));
  EXPECT_FALSE(dist::nccl_available());
  EXPECT_NE(nccl.find("this build of d9d-peft has no NCCL"), std::string::npos) << nccl;
#endif
}

// ------------------------------------------------------------ d9d-peft-train --nproc
// Compiled only with the trainer (D9D_PEFT_BUILD_EXAMPLES, on in CI): never skipped at run time.
#ifdef D9D_TRAINER

struct TrainerJob {
  int exit_code = -1;
  std::string log;  // stdout and stderr
  fs::path out;
};

/// One run of the trainer on a tiny model, in `<test>/<name>`; the runs of one
/// test share their base (the first pretrains it).
TrainerJob run_trainer(const std::string& test, const std::string& name, const std::string& extra_args,
                       double dropout = 0.0, int64_t steps = 20) {
  const fs::path dir = fs::current_path() / "data_parallel_runs" / test;
  fs::create_directories(dir);
  const fs::path config = dir / (name + ".json");
  std::ofstream(config) << R"({"name": "ddp", "seed": 5,
    "task": {"symbols": 8, "length": 4, "eval_sequences": 64},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64},
    "pretrain": {"steps": 60, "batch_size": 16, "lr": 5e-3, "warmup_steps": 5},
    "finetune": {"steps": )" << steps
                        << R"(, "batch_size": 16, "lr": 5e-3, "warmup_steps": 2},
    "base_checkpoint": ")" << (dir / "base").string()
                        << R"(", "log_every": 10,
    "peft": {"kind": "lora", "module_name_pattern": ".*_proj", "params": {"r": 4, "alpha": 8, "dropout": )"
                        << dropout << "}}}\n";
  TrainerJob job;
  job.out = dir / name;
  const fs::path log = dir / (name + ".log");
  const std::string command = std::string("'") + D9D_TRAINER + "' --config '" + config.string() + "' --out '" +
                              job.out.string() + "' " + extra_args + " > '" + log.string() + "' 2>&1";
  const int status = std::system(command.c_str());
  job.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  job.log = read_text(log);
  return job;
}

std::shared_ptr<ms::SafetensorsFile> adapter_of(const TrainerJob& job) {
  return ms::SafetensorsFile::open((job.out / "adapter" / "adapter_model.safetensors").string());
}

size_t count_of(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

TEST(TrainerDataParallel, TwoAndFourRanksTrainTheAdapterOneProcessTrains) {
  fs::remove_all(fs::current_path() / "data_parallel_runs" / "trainer_ranks");
  const TrainerJob one = run_trainer("trainer_ranks", "one", "");  // pretrains the shared base
  ASSERT_EQ(one.exit_code, 0) << one.log;
  const auto reference = adapter_of(one);
  for (const int64_t n : {2, 4}) {
    const TrainerJob job = run_trainer("trainer_ranks", "nproc" + std::to_string(n), "--nproc " + std::to_string(n));
    ASSERT_EQ(job.exit_code, 0) << job.log;
    EXPECT_EQ(count_of(job.log, "result: OK"), 1u) << "only rank 0 reports\n" << job.log;
    EXPECT_NE(job.log.find(std::to_string(n) + " ranks (gloo"), std::string::npos) << job.log;
    // The same global batches, split over the ranks: the same adapter, up to
    // the order in which the ranks' means are added.
    const auto adapter = adapter_of(job);
    ASSERT_EQ(adapter->keys(), reference->keys());
    for (const auto& key : reference->keys()) {
      EXPECT_LE((adapter->get(key) - reference->get(key)).abs().max().item<double>(), 1e-5) << key;
    }
    const auto summary = nlohmann::json::parse(read_text(job.out / "summary.json"));
    EXPECT_EQ(summary.at("ranks"), n);
    EXPECT_EQ(summary.at("bytes_all_reduced_per_step").get<int64_t>(),
              summary.at("trainable_parameters").get<int64_t>() * 4)  // fp32: the adapters, nothing else
        << summary.dump();
  }
}

TEST(TrainerDataParallel, AResumedRunEqualsAnUninterruptedOneBitForBit) {
  fs::remove_all(fs::current_path() / "data_parallel_runs" / "trainer_resume");
  const TrainerJob whole = run_trainer("trainer_resume", "whole", "--nproc 2", /*dropout=*/0.1);
  ASSERT_EQ(whole.exit_code, 0) << whole.log;
  const TrainerJob stopped = run_trainer("trainer_resume", "parts", "--nproc 2 --stop-after-step 7", 0.1);
  ASSERT_EQ(stopped.exit_code, 0) << stopped.log;
  EXPECT_NE(stopped.log.find("stopped after fine-tuning step 7 of 20"), std::string::npos) << stopped.log;
  const TrainerJob resumed = run_trainer("trainer_resume", "parts", "--nproc 2 --resume", 0.1);
  ASSERT_EQ(resumed.exit_code, 0) << resumed.log;
  EXPECT_EQ(read_text(resumed.out / "adapter" / "adapter_model.safetensors"),
            read_text(whole.out / "adapter" / "adapter_model.safetensors"));
}

TEST(TrainerDataParallel, ABatchTheRanksCannotShareIsRefusedBeforeAnyStarts) {
  fs::remove_all(fs::current_path() / "data_parallel_runs" / "trainer_batch");
  const TrainerJob job = run_trainer("trainer_batch", "three", "--nproc 3");
  EXPECT_EQ(job.exit_code, 1) << job.log;
  EXPECT_NE(job.log.find("batch_size is 16, which 3 ranks cannot share evenly"), std::string::npos) << job.log;
  EXPECT_EQ(job.log.find("starting"), std::string::npos) << job.log;
  EXPECT_FALSE(fs::exists(job.out));
}

#endif  // D9D_TRAINER

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--worker") {
    try {
      return run_worker(parse_worker(argc, argv));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "worker: %s\n", e.what());
      return 4;
    }
  }
  g_self = fs::canonical("/proc/self/exe").string();
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
