#pragma once
// Data-parallel training of what a PEFT method left trainable: the C++
// counterpart of PyTorch's DistributedDataParallel, for LibTorch modules.
//
// ```
// auto group = d9d::distributed::init_process_group();   // torchrun's environment
// d9d::distributed::DistributedDataParallel ddp(*model, group);
// for (...) {
//   optimizer.zero_grad();
//   loss_on_this_ranks_shard(model).backward();   // gradients are averaged here
//   optimizer.step();
// }
// ```
//
// At construction every rank takes rank 0's trainable parameters (those with
// `requires_grad`; frozen ones are never sent). During `backward()` the
// gradients are copied into flat buckets of at most `bucket_cap_mb` as they
// become ready, and each full bucket is summed over the ranks at once (one
// collective per bucket) while backward goes on; when backward ends, every
// trainable parameter's `.grad` holds the mean over the ranks. Buckets are
// filled in reverse registration order, the order backward produces them.
// A trainable parameter that gets no gradient in a backward (on this rank)
// contributes zeros, and ends with the mean of the others' gradients (zeros
// when no rank had one), never with none, so that every rank steps alike.

#include <d9d/distributed/process_group.h>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace d9d::distributed {

/// Chained options: `DistributedDataParallelOptions().bucket_cap_mb(4)`.
struct DistributedDataParallelOptions {
  /// The largest bucket, in MiB (a single larger parameter gets a bucket of its own).
  DistributedDataParallelOptions& bucket_cap_mb(double mb) {
    bucket_cap_mb_ = mb;
    return *this;
  }
  /// Take rank 0's trainable parameters at construction (default on).
  DistributedDataParallelOptions& broadcast_parameters(bool on) {
    broadcast_parameters_ = on;
    return *this;
  }
  double bucket_cap_mb() const { return bucket_cap_mb_; }
  bool broadcast_parameters() const { return broadcast_parameters_; }

 private:
  double bucket_cap_mb_ = 25.0;
  bool broadcast_parameters_ = true;
};

/// What the last synchronised backward communicated, and totals.
struct CommunicationStats {
  /// Backward passes whose gradients were averaged (not those under `no_sync`).
  int64_t synchronized_steps = 0;
  /// Bytes summed over the ranks by the last synchronised backward: exactly the
  /// trainable parameters' bytes.
  int64_t last_bytes_all_reduced = 0;
  int64_t last_collectives = 0;
  /// Of those, how many were sent while backward was still computing (the
  /// rest went out when it ended): the overlap of communication and compute.
  int64_t last_collectives_during_backward = 0;
  /// Seconds the last synchronised backward spent blocked on communication
  /// after its own computation had ended (what overlap did not hide).
  double last_wait_seconds = 0;
  int64_t total_bytes_all_reduced = 0;
  double total_wait_seconds = 0;
};

namespace detail {
struct DataParallelState;
}

class DistributedDataParallel {
 public:
  /// Attaches to `module`'s trainable parameters as they are now: inject and
  /// freeze first (and load the base), then construct this. Verifies that
  /// every rank holds the same trainable parameters (names, shapes, dtypes)
  /// and throws a `DistributedError` naming the first difference otherwise.
  DistributedDataParallel(torch::nn::Module& module, ProcessGroup group,
                          DistributedDataParallelOptions options = {});
  ~DistributedDataParallel();
  DistributedDataParallel(const DistributedDataParallel&) = delete;
  DistributedDataParallel& operator=(const DistributedDataParallel&) = delete;

  /// While the returned guard lives, backward passes only accumulate local
  /// gradients (gradient accumulation); the first backward after it averages
  /// everything accumulated.
  class NoSync {
   public:
    explicit NoSync(DistributedDataParallel& ddp);
    ~NoSync();
    NoSync(const NoSync&) = delete;
    NoSync& operator=(const NoSync&) = delete;

   private:
    DistributedDataParallel& ddp_;
    bool previous_;
  };
  NoSync no_sync() { return NoSync(*this); }

  const ProcessGroup& group() const;
  /// The parameters kept in sync (in registration order), and their names.
  const std::vector<at::Tensor>& parameters() const;
  const std::vector<std::string>& parameter_names() const;
  /// The bytes of those parameters (what one synchronised backward sends).
  int64_t trainable_bytes() const;
  int64_t bucket_count() const;
  const CommunicationStats& stats() const;

 private:
  std::unique_ptr<detail::DataParallelState> state_;
};

}  // namespace d9d::distributed
