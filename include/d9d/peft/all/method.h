#pragma once

#include <d9d/peft/all/config.h>
#include <d9d/peft/base.h>

#include <memory>
#include <vector>

namespace d9d::peft {

/// Applies several methods in order and merges them in reverse order. If one
/// method fails to inject, the ones already applied are merged back (their
/// adapters are still zero, so the weights are unchanged) before the error
/// propagates.
class PeftStack : public PeftMethod<PeftStackConfig> {
 public:
  explicit PeftStack(std::vector<std::unique_ptr<PeftMethodBase>> methods);
  static PeftStack from_config(const PeftStackConfig& config);

  PeftInjectionResult inject(torch::nn::Module& module) override;
  void merge(torch::nn::Module& module) override;

  const std::vector<std::unique_ptr<PeftMethodBase>>& methods() const noexcept { return methods_; }

 private:
  std::vector<std::unique_ptr<PeftMethodBase>> methods_;
};

/// Builds the method a configuration describes.
std::unique_ptr<PeftMethodBase> peft_method_from_config(const AnyPeftConfig& config);

}  // namespace d9d::peft
