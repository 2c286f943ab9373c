// The Gloo backend: c10d's ProcessGroupGloo, declared only when USE_C10D_GLOO
// is defined (LibTorch's own build defines it; its installed headers do not).
// Its headers include Gloo's, which Debian's libgloo-dev provides for both
// LibTorch builds (only declarations are used from them).
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif

#include "group_state.h"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

namespace d9d::distributed::detail {

c10::intrusive_ptr<C10dGroup> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, int64_t rank, int64_t size,
                                        std::chrono::milliseconds timeout) {
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  // The loopback-or-hostname device c10d picks by default (GLOO_SOCKET_IFNAME
  // overrides it, as for PyTorch).
  options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, static_cast<int>(rank), static_cast<int>(size), options);
}

}  // namespace d9d::distributed::detail
