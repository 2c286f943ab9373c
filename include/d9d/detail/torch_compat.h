#pragma once
// The one place where d9d-peft depends on how a particular LibTorch is built:
// what differs between the versions it supports (Debian's 1.13 and the 2.x in
// PyTorch's wheels) and the few things it needs that LibTorch's documented C++
// API does not offer. Every function here is exercised by
// tests/test_torch_compat.cpp, which CI runs against both versions.

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <torch/nn/module.h>
#include <torch/version.h>

#include <cstdint>
#include <mutex>
#include <string>

namespace d9d::detail::torch_compat {

/// The LibTorch this translation unit was compiled against.
inline constexpr int kTorchVersionMajor = TORCH_VERSION_MAJOR;
inline constexpr int kTorchVersionMinor = TORCH_VERSION_MINOR;

/// 64 random bits from LibTorch's default CPU generator (so `torch::manual_seed`
/// makes them reproducible), without allocating a tensor to draw them.
/// `at::Generator` exposes its mutex and `CPUGeneratorImpl::random64` in 1.13
/// and 2.x alike; the generator must be locked while drawing, as ATen's own
/// kernels do.
inline uint64_t draw_cpu_random64() {
  at::Generator generator = at::globalContext().defaultGenerator(c10::DeviceType::CPU);
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get<at::CPUGeneratorImpl>()->random64();
}

/// Removes parameter `name` from `module`'s own registry (not its children's)
/// and returns whether it was there. LibTorch's C++ modules can register a
/// parameter but not unregister one; its registry is the protected
/// `Module::parameters_`, reached here through a derived class's member pointer
/// (standard C++, no layout assumption). Adapter layers use this when an
/// adapter is deleted or merged so that `named_parameters()` stops listing it.
inline bool unregister_parameter(torch::nn::Module& module, const std::string& name) {
  struct Registry : torch::nn::Module {
    using torch::nn::Module::parameters_;
  };
  auto& parameters = module.*(&Registry::parameters_);
  if (!parameters.contains(name)) return false;
  parameters.erase(name);
  return true;
}

}  // namespace d9d::detail::torch_compat
