#pragma once

#include <d9d/peft/base.h>
#include <d9d/peft/full_tune/config.h>
#include <d9d/peft/pattern.h>


namespace d9d::peft {

/// Full fine-tuning of selected modules: every parameter of a module whose
/// qualified name fully matches the pattern is trained. No structural change,
/// no mapper, nothing to merge. A pattern that matches no module, or only
/// modules without parameters, is a `PeftError`.
class FullTune : public PeftMethod<FullTuneConfig> {
 public:
  explicit FullTune(FullTuneConfig config);
  static FullTune from_config(const FullTuneConfig& config) { return FullTune(config); }

  PeftInjectionResult inject(torch::nn::Module& module) override;
  void merge(torch::nn::Module& module) override;

 private:
  Pattern pattern_;
};

}  // namespace d9d::peft
