#pragma once

#include <d9d/model_state/load.h>
#include <d9d/peft/adapter_layer.h>
#include <d9d/model_state/mapper/mapper.h>

#include <ATen/core/Tensor.h>

#include <vector>

namespace torch::nn {
class Module;
}

namespace d9d::peft {

/// What injecting a PEFT method did to a model.
struct PeftInjectionResult {
  /// Parameters that should be trained (everything else stays frozen).
  std::vector<at::Tensor> parameters_to_train;
  /// Mappers that route the original model's keys to the modified structure.
  std::vector<model_state::MapperPtr> load_state_mappers;
};

/// The type-erased interface of every PEFT method; what `inject_peft_and_freeze`,
/// `merge_peft` and `PeftStack` take.
class PeftMethodBase {
 public:
  virtual ~PeftMethodBase() = default;

  /// Modifies `module` in place (e.g. wraps layers with adapters). Either
  /// fully succeeds or throws leaving the module as it was.
  virtual PeftInjectionResult inject(torch::nn::Module& module) = 0;

  /// Folds trained adapters back into the base weights, restoring the
  /// original module structure.
  virtual void merge(torch::nn::Module& module) = 0;
};

/// A PEFT method driven by a configuration of type `Config`.
template <typename Config>
class PeftMethod : public PeftMethodBase {
 public:
  using config_type = Config;

  explicit PeftMethod(Config config) : config_(std::move(config)) {}
  const Config& config() const noexcept { return config_; }

 protected:
  Config config_;
};


}  // namespace d9d::peft
