#pragma once
// A process group for data-parallel training, set up the way torchrun sets up
// PyTorch's: from RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT,
// on LibTorch's own c10d engine (Gloo on the CPU, NCCL on CUDA).
//
// ```
// auto group = d9d::distributed::init_process_group();          // torchrun's environment
// d9d::distributed::DistributedDataParallel ddp(*model, group);  // data_parallel.h
// ```

#include <d9d/error.h>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace d9d::distributed {

/// A process group could not be set up, or a collective failed (a rank
/// exited, timed out, or holds other parameters). The message names the rank
/// and says what to check.
class DistributedError : public d9d::Error {
 public:
  using d9d::Error::Error;
};

/// Where this process sits in the job, as torchrun (and `launch_local`, and
/// most cluster launchers) tell it through the environment.
struct LaunchEnv {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  /// torchrun's agent already hosts the rendezvous store at MASTER_ADDR:
  /// MASTER_PORT (`TORCHELASTIC_USE_AGENT_STORE=True`), so every rank
  /// connects to it as a client, under the prefix of the agent's restart
  /// attempt, as PyTorch's own `init_process_group` does.
  bool agent_store = false;
  int64_t restart_count = 0;

  /// The environment's launch variables, or nothing when WORLD_SIZE is unset
  /// (the process was not launched data-parallel). A variable that is set but
  /// malformed, or missing while WORLD_SIZE is set, is a `DistributedError`
  /// naming it.
  static std::optional<LaunchEnv> from_environment();
};

/// How `init_process_group` connects; chained, LibTorch style:
/// `ProcessGroupOptions().timeout(std::chrono::seconds(60))`.
struct ProcessGroupOptions {
  /// "gloo" or "nccl"; empty: by `device` (gloo on the CPU, nccl on CUDA).
  ProcessGroupOptions& backend(std::string name) {
    backend_ = std::move(name);
    return *this;
  }
  /// The device whose tensors the group reduces. CUDA: `cuda:<LOCAL_RANK>`
  /// unless an index is given.
  ProcessGroupOptions& device(c10::Device device) {
    device_ = device;
    return *this;
  }
  /// How long a rank waits for the others: to join, and in any collective.
  /// A rank that dies is usually noticed at once (its connections close); one
  /// that hangs is reported when this runs out.
  ProcessGroupOptions& timeout(std::chrono::milliseconds timeout) {
    timeout_ = timeout;
    return *this;
  }

  const std::string& backend() const { return backend_; }
  c10::Device device() const { return device_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

 private:
  std::string backend_;
  c10::Device device_ = c10::kCPU;
  std::chrono::milliseconds timeout_ = std::chrono::minutes(5);
};

namespace detail {
struct GroupState;
struct PendingState;
}  // namespace detail

/// A collective in flight. `wait()` blocks until it is done and turns a
/// failure into a `DistributedError` that names the ranks that have gone.
class PendingCollective {
 public:
  PendingCollective() = default;
  explicit PendingCollective(std::shared_ptr<detail::PendingState> state) : state_(std::move(state)) {}
  void wait();
  bool valid() const { return state_ != nullptr; }

 private:
  std::shared_ptr<detail::PendingState> state_;
};

/// A handle on a c10d process group (copies share it). Every rank of the
/// group must issue the same collectives in the same order.
class ProcessGroup {
 public:
  int64_t rank() const;
  int64_t size() const;
  /// "gloo" or "nccl".
  const std::string& backend() const;
  c10::Device device() const;
  std::chrono::milliseconds timeout() const;

  /// Sums `tensor` over the ranks, in place, asynchronously.
  PendingCollective all_reduce_sum(at::Tensor& tensor);
  /// Elementwise minimum and maximum over the ranks, in place, synchronously.
  void all_reduce_min(at::Tensor& tensor);
  void all_reduce_max(at::Tensor& tensor);
  /// Copies rank `root`'s `tensor` into every rank's, asynchronously.
  PendingCollective broadcast(at::Tensor& tensor, int64_t root = 0);
  /// Returns when every rank has called it.
  void barrier();

  /// `failure`, explained: which ranks are known to have exited (those on
  /// this host are checked by process id), and what to look at otherwise.
  /// What `PendingCollective::wait` throws.
  DistributedError explain_failure(const std::string& what, const std::exception& failure) const;

  explicit ProcessGroup(std::shared_ptr<detail::GroupState> state) : state_(std::move(state)) {}
  const std::shared_ptr<detail::GroupState>& state() const { return state_; }

 private:
  std::shared_ptr<detail::GroupState> state_;
};

/// Joins the job described by `env` (rank 0 hosts the rendezvous store unless
/// torchrun's agent does) and creates a Gloo or NCCL group. Every rank must
/// call it; it returns once all have joined, or throws a `DistributedError`
/// naming the ranks that did not join within the timeout.
ProcessGroup init_process_group(const LaunchEnv& env, const ProcessGroupOptions& options = {});

/// `init_process_group(LaunchEnv::from_environment())`; a `DistributedError`
/// saying how to launch when WORLD_SIZE is unset.
ProcessGroup init_process_group(const ProcessGroupOptions& options = {});

/// Whether this LibTorch build can create an NCCL group (LibTorch 2.x with CUDA).
bool nccl_available();

}  // namespace d9d::distributed
