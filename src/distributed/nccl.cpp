// The NCCL backend, in LibTorch 2.x builds with CUDA (D9D_PEFT_NCCL is set by
// CMake there; c10d's header needs USE_C10D_NCCL and NCCL's nccl.h).
#include "group_state.h"

#ifdef D9D_PEFT_NCCL
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL 1
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace d9d::distributed {

bool nccl_available() {
#ifdef D9D_PEFT_NCCL
  return true;
#else
  return false;
#endif
}

namespace detail {

c10::intrusive_ptr<C10dGroup> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int64_t rank, int64_t size,
                                        std::chrono::milliseconds timeout) {
#ifdef D9D_PEFT_NCCL
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, static_cast<int>(rank), static_cast<int>(size), options);
#else
  (void)store, (void)rank, (void)size, (void)timeout;
  throw DistributedError(
      "backend \"nccl\": this build of d9d-peft has no NCCL (it needs LibTorch 2.x with CUDA); use \"gloo\"");
#endif
}

}  // namespace detail
}  // namespace d9d::distributed
