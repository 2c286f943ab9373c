#include "group_state.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>
#include <unistd.h>

namespace d9d::distributed {

namespace {

/// The text of an exception without LibTorch's C++ backtrace.
std::string reason(const std::exception& e) {
  std::string text;
  if (const auto* c10 = dynamic_cast<const c10::Error*>(&e)) {
    text = c10->what_without_backtrace();
  } else {
    text = e.what();
  }
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

std::optional<std::string> env_var(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) return std::nullopt;
  return std::string(value);
}

int64_t parse_int(const char* name, const std::string& value, int64_t min, int64_t max) {
  size_t used = 0;
  long long n = 0;
  try {
    n = std::stoll(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (value.empty() || used != value.size() || n < min || n > max) {
    throw DistributedError(fmt::format("environment variable {}=\"{}\": expected an integer in [{}, {}]", name, value,
                                       min, max));
  }
  return n;
}

/// Whether process `pid` on this host has ended (gone, or a zombie not yet reaped).
bool process_ended(int64_t pid) {
  if (pid <= 0) return false;
  if (::kill(static_cast<pid_t>(pid), 0) != 0) return errno == ESRCH;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  const auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
}

std::string seconds(std::chrono::milliseconds t) { return fmt::format("{:g} s", t.count() / 1000.0); }

}  // namespace

std::string detail::host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "?";
  return buf;
}

std::optional<LaunchEnv> LaunchEnv::from_environment() {
  const auto world = env_var("WORLD_SIZE");
  if (!world) return std::nullopt;
  LaunchEnv env;
  env.world_size = parse_int("WORLD_SIZE", *world, 1, 1 << 20);
  const auto rank = env_var("RANK");
  if (!rank) {
    throw DistributedError("environment: WORLD_SIZE is set but RANK is not; launch with torchrun, d9d-peft-train "
                           "--nproc, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process");
  }
  env.rank = parse_int("RANK", *rank, 0, env.world_size - 1);
  env.local_rank = env_var("LOCAL_RANK") ? parse_int("LOCAL_RANK", *env_var("LOCAL_RANK"), 0, 1 << 20) : 0;
  if (const auto addr = env_var("MASTER_ADDR")) {
    if (addr->empty()) throw DistributedError("environment variable MASTER_ADDR is empty; set it to rank 0's host");
    env.master_addr = *addr;
  } else if (env.world_size > 1) {
    throw DistributedError("environment: WORLD_SIZE=" + *world +
                           " but MASTER_ADDR is not set; set it to the host of rank 0 (127.0.0.1 on one machine)");
  }
  if (const auto port = env_var("MASTER_PORT")) {
    env.master_port = static_cast<int>(parse_int("MASTER_PORT", *port, 1, 65535));
  } else if (env.world_size > 1) {
    throw DistributedError("environment: WORLD_SIZE=" + *world +
                           " but MASTER_PORT is not set; set it to a free TCP port on rank 0's host");
  }
  env.agent_store = env_var("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
  if (env.agent_store) {
    env.restart_count = env_var("TORCHELASTIC_RESTART_COUNT")
                            ? parse_int("TORCHELASTIC_RESTART_COUNT", *env_var("TORCHELASTIC_RESTART_COUNT"), 0, 1 << 20)
                            : 0;
  }
  return env;
}

ProcessGroup init_process_group(const ProcessGroupOptions& options) {
  const auto env = LaunchEnv::from_environment();
  if (!env) {
    throw DistributedError(
        "init_process_group: WORLD_SIZE is not set, so this process was not launched data-parallel; launch it with "
        "torchrun --no-python, d9d-peft-train --nproc N, or d9d::distributed::launch_local, or set RANK, WORLD_SIZE, "
        "MASTER_ADDR and MASTER_PORT");
  }
  return init_process_group(*env, options);
}

ProcessGroup init_process_group(const LaunchEnv& env, const ProcessGroupOptions& options) {
  auto state = std::make_shared<detail::GroupState>();
  state->rank = env.rank;
  state->size = env.world_size;
  state->timeout = options.timeout();
  if (env.world_size < 1 || env.rank < 0 || env.rank >= env.world_size) {
    throw DistributedError(fmt::format("init_process_group: rank {} is not in [0, {})", env.rank, env.world_size));
  }
  if (options.timeout().count() <= 0) throw DistributedError("ProcessGroupOptions.timeout must be positive");
  state->backend = options.backend().empty() ? (options.device().is_cuda() ? "nccl" : "gloo") : options.backend();
  state->device = options.device();
  if (state->backend == "nccl") {
    if (!state->device.is_cuda()) {
      throw DistributedError("ProcessGroupOptions: backend \"nccl\" reduces CUDA tensors; set device(cuda) or use "
                             "\"gloo\" on the CPU");
    }
    if (!nccl_available()) {
      throw DistributedError("ProcessGroupOptions: backend \"nccl\": this build of d9d-peft has no NCCL (it needs "
                             "LibTorch 2.x with CUDA); use \"gloo\" on the CPU");
    }
    if (!at::hasCUDA()) {
      throw DistributedError("ProcessGroupOptions: backend \"nccl\" needs a CUDA device, and none is visible");
    }
    if (!state->device.has_index()) state->device = c10::Device(c10::kCUDA, static_cast<int8_t>(env.local_rank));
  } else if (state->backend == "gloo") {
    if (!state->device.is_cpu()) {
      throw DistributedError("ProcessGroupOptions: this library runs Gloo on the CPU; use backend \"nccl\" for " +
                             state->device.str());
    }
  } else {
    throw DistributedError("ProcessGroupOptions.backend: unknown backend \"" + state->backend +
                           "\"; expected \"gloo\" or \"nccl\"");
  }
  const std::string where = fmt::format("{}:{}", env.master_addr, env.master_port);
  const std::string me = fmt::format("rank {} of {}", env.rank, env.world_size);

  // The rendezvous store, as PyTorch's init_process_group makes it.
  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<uint16_t>(env.master_port);
  store_options.timeout = options.timeout();
  store_options.waitWorkers = false;  // the join below waits, and names who is missing
  store_options.multiTenant = true;
  if (env.agent_store) {
    store_options.isServer = false;
  } else {
    store_options.isServer = env.rank == 0;
    store_options.numWorkers = static_cast<size_t>(env.world_size);
  }
  try {
    auto tcp = c10::make_intrusive<c10d::TCPStore>(env.master_addr, store_options);
    state->store = env.agent_store ? c10::intrusive_ptr<c10d::Store>(c10::make_intrusive<c10d::PrefixStore>(
                                         "/worker/attempt_" + std::to_string(env.restart_count), tcp))
                                   : c10::intrusive_ptr<c10d::Store>(tcp);
  } catch (const std::exception& e) {
    if (store_options.isServer) {
      throw DistributedError(fmt::format("{}: cannot host the rendezvous store on {}: {}\nAnother job may hold the "
                                         "port: set MASTER_PORT to a free one.",
                                         me, where, reason(e)));
    }
    throw DistributedError(fmt::format("{}: cannot reach the rendezvous store at {} within {}: {}\nRank 0 hosts it "
                                       "(unless torchrun's agent does): check that it started, and MASTER_ADDR / "
                                       "MASTER_PORT.",
                                       me, where, seconds(options.timeout()), reason(e)));
  }
  state->store->setTimeout(options.timeout());

  // Join: every rank records its host and process id (which also lets a
  // failure name the ranks that have exited), then waits for all the others.
  const std::string prefix = "d9d/rank/";
  std::vector<std::string> keys;
  for (int64_t r = 0; r < env.world_size; ++r) keys.push_back(prefix + std::to_string(r));
  const std::string record = fmt::format("{} {}", detail::host_name(), static_cast<int64_t>(::getpid()));
  try {
    state->store->set(keys[env.rank], std::vector<uint8_t>(record.begin(), record.end()));
    state->store->wait(keys, options.timeout());
  } catch (const std::exception& e) {
    std::vector<int64_t> missing;
    for (int64_t r = 0; r < env.world_size; ++r) {
      try {
        if (!state->store->check({keys[r]})) missing.push_back(r);
      } catch (const std::exception&) {
        missing.clear();
        break;
      }
    }
    if (!missing.empty()) {
      throw DistributedError(fmt::format("{}: rank{} {} did not join at {} within {}; start every rank (WORLD_SIZE={}) "
                                         "with the same MASTER_ADDR and MASTER_PORT",
                                         me, missing.size() > 1 ? "s" : "", fmt::join(missing, ", "), where,
                                         seconds(options.timeout()), env.world_size));
    }
    throw DistributedError(fmt::format("{}: joining at {} failed: {}", me, where, reason(e)));
  }
  state->ranks.resize(static_cast<size_t>(env.world_size));
  for (int64_t r = 0; r < env.world_size; ++r) {
    const auto bytes = state->store->get(keys[r]);
    std::istringstream in(std::string(bytes.begin(), bytes.end()));
    in >> state->ranks[r].host >> state->ranks[r].pid;
  }

  try {
    state->group = state->backend == "nccl"
                       ? detail::make_nccl(state->store, env.rank, env.world_size, options.timeout())
                       : detail::make_gloo(state->store, env.rank, env.world_size, options.timeout());
  } catch (const DistributedError&) {
    throw;
  } catch (const std::exception& e) {
    throw ProcessGroup(state).explain_failure("creating the " + state->backend + " group", e);
  }
  return ProcessGroup(state);
}

int64_t ProcessGroup::rank() const { return state_->rank; }
int64_t ProcessGroup::size() const { return state_->size; }
const std::string& ProcessGroup::backend() const { return state_->backend; }
c10::Device ProcessGroup::device() const { return state_->device; }
std::chrono::milliseconds ProcessGroup::timeout() const { return state_->timeout; }

namespace {

std::string describe(const char* op, const at::Tensor& t) {
  return fmt::format("{} of {} bytes", op, t.numel() * static_cast<int64_t>(t.element_size()));
}

}  // namespace

namespace {

/// Starts a collective through `start`; its failure, now or when waited for,
/// is explained by `group`.
template <class Start>
PendingCollective start_collective(const ProcessGroup& group, std::string what, Start&& start) {
  auto pending = std::make_shared<detail::PendingState>();
  pending->group = group.state();
  pending->what = std::move(what);
  try {
    pending->work = start(*group.state()->group);
  } catch (const std::exception& e) {
    throw group.explain_failure(pending->what, e);
  }
  return PendingCollective(std::move(pending));
}

PendingCollective all_reduce(const ProcessGroup& group, at::Tensor& tensor, c10d::ReduceOp op, const char* name) {
  return start_collective(group, describe(name, tensor), [&](detail::C10dGroup& c10d_group) {
    std::vector<at::Tensor> tensors{tensor};
    c10d::AllreduceOptions options;
    options.reduceOp = op;
    return c10d_group.allreduce(tensors, options);
  });
}

}  // namespace

PendingCollective ProcessGroup::all_reduce_sum(at::Tensor& tensor) {
  return all_reduce(*this, tensor, c10d::ReduceOp::SUM, "all_reduce");
}

void ProcessGroup::all_reduce_min(at::Tensor& tensor) {
  all_reduce(*this, tensor, c10d::ReduceOp::MIN, "all_reduce(min)").wait();
}

void ProcessGroup::all_reduce_max(at::Tensor& tensor) {
  all_reduce(*this, tensor, c10d::ReduceOp::MAX, "all_reduce(max)").wait();
}

PendingCollective ProcessGroup::broadcast(at::Tensor& tensor, int64_t root) {
  return start_collective(*this, describe("broadcast", tensor), [&](detail::C10dGroup& c10d_group) {
    std::vector<at::Tensor> tensors{tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    return c10d_group.broadcast(tensors, options);
  });
}

void ProcessGroup::barrier() {
  try {
    state_->group->barrier()->wait();
  } catch (const std::exception& e) {
    throw explain_failure("barrier", e);
  }
}

DistributedError ProcessGroup::explain_failure(const std::string& what, const std::exception& failure) const {
  const std::string here = detail::host_name();
  std::vector<std::string> gone;
  // A killed process closes its sockets a moment before it is seen to have
  // ended (before it becomes a zombie): look again for up to two seconds.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (true) {
    for (int64_t r = 0; r < static_cast<int64_t>(state_->ranks.size()); ++r) {
      const auto& record = state_->ranks[r];
      if (r != state_->rank && record.host == here && process_ended(record.pid)) {
        gone.push_back(fmt::format("rank {} (pid {})", r, record.pid));
      }
    }
    if (!gone.empty() || std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::string text = fmt::format("rank {} of {}: {} failed: {}\n", state_->rank, state_->size, what, reason(failure));
  if (!gone.empty()) {
    text += fmt::format("{} {} exited, so the job cannot go on; its own output says why it stopped.",
                        fmt::join(gone, ", "), gone.size() > 1 ? "have" : "has");
  } else {
    bool remote = false;
    for (const auto& record : state_->ranks) remote = remote || record.host != here;
    text += fmt::format("No rank on this host ({}) has exited{}; a rank may be stuck, or the network failed "
                        "(the timeout is {}).",
                        here, remote ? "; ranks on other hosts cannot be checked from here" : "",
                        seconds(state_->timeout));
  }
  return DistributedError(text);
}

void PendingCollective::wait() {
  if (!state_) throw DistributedError("PendingCollective::wait: nothing is pending (a default-constructed handle)");
  try {
    state_->work->wait();
  } catch (const std::exception& e) {
    throw ProcessGroup(state_->group).explain_failure(state_->what, e);
  }
}

}  // namespace d9d::distributed
