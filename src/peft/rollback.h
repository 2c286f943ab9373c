#pragma once

// Undoing a failed injection: what `PeftStack`, `inject_peft_and_freeze` and
// `hf::load_adapter` restore when a step fails part-way.

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace torch::nn {
class Module;
}

namespace d9d::peft {

/// A snapshot of a model's PEFT state: which adapter layers hold which
/// adapters (active, enabled), and every parameter's `requires_grad`.
/// `restore()` takes out every adapter layer and adapter added since, without
/// merging anything, so every base weight stays bit for bit what it was.
class InjectionSnapshot {
 public:
  explicit InjectionSnapshot(torch::nn::Module& model);
  /// Puts the model back as it was when the snapshot was taken. Never throws
  /// for a model only injected into since (it is called while an error propagates).
  void restore() noexcept;

 private:
  struct LayerState {
    std::shared_ptr<torch::nn::Module> module;
    std::vector<std::string> adapters;
    std::vector<std::string> active;
    bool enabled = true;
  };
  torch::nn::Module& model_;
  std::vector<LayerState> layers_;
  std::vector<std::pair<at::Tensor, bool>> flags_;
};

}  // namespace d9d::peft
