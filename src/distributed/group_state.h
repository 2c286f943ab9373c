#pragma once
// What a d9d::distributed::ProcessGroup holds: the c10d objects, which differ
// between the LibTorch versions this library supports. In 1.13 a Gloo or NCCL
// group is a `c10d::ProcessGroup`; from 2.0 it is a `c10d::Backend` (the
// ProcessGroup became a dispatcher over backends). Both offer the same
// allreduce / broadcast / barrier calls, which is all this library uses.

#include <d9d/distributed/process_group.h>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/version.h>

#if TORCH_VERSION_MAJOR >= 2
#include <torch/csrc/distributed/c10d/Backend.hpp>
#endif

#include <string>
#include <vector>

namespace d9d::distributed::detail {

#if TORCH_VERSION_MAJOR >= 2
using C10dGroup = c10d::Backend;
#else
using C10dGroup = c10d::ProcessGroup;
#endif

/// One rank of the job, as it announced itself when it joined.
struct RankRecord {
  std::string host;
  int64_t pid = 0;
};

struct GroupState {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<C10dGroup> group;
  int64_t rank = 0;
  int64_t size = 1;
  std::string backend;
  c10::Device device = c10::kCPU;
  std::chrono::milliseconds timeout{0};
  std::vector<RankRecord> ranks;  // by rank
};

struct PendingState {
  c10::intrusive_ptr<c10d::Work> work;
  std::shared_ptr<GroupState> group;
  std::string what;  // "all_reduce of 4 MiB", for the error
};

/// Creates the backend; defined in gloo.cpp and nccl.cpp.
c10::intrusive_ptr<C10dGroup> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, int64_t rank, int64_t size,
                                        std::chrono::milliseconds timeout);
c10::intrusive_ptr<C10dGroup> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int64_t rank, int64_t size,
                                        std::chrono::milliseconds timeout);

/// This host's name, as ranks record it.
std::string host_name();

}  // namespace d9d::distributed::detail
