#pragma once

#include <d9d/nn/adaptable.h>
#include <d9d/nn/linear.h>
#include <d9d/peft/base.h>
#include <d9d/peft/lora/config.h>

#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

namespace d9d::peft {

/// A LoRA wrapper around a linear layer: `base(x) + scale * lora_B(lora_A(dropout(x)))`
/// with `scale = alpha / r`.
///
/// Children: `base` (the original layer, keys `base.weight`, `base.bias`),
/// `lora_A` (`[r, in]`, kaiming-uniform), `lora_B` (`[out, r]`, zeros) and
/// `dropout`. The adapters are created on the base weight's device and dtype.
/// The base is either a `d9d::nn::Linear` (whose calls are then routed here)
/// or a `torch::nn::Linear` held by a `Sequential`, `ModuleList` or `ModuleDict`.
class LoRALinearImpl : public torch::nn::Module, public d9d::nn::LayerOverride, public AdapterLayer {
 public:
  LoRALinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoRAParameters& params);
  LoRALinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoRAParameters& params);

  at::Tensor forward(const at::Tensor& input) override;

  /// `lora_A` kaiming-uniform(a = sqrt(5)), `lora_B` zeros: the wrapper starts
  /// out computing exactly what the base computes.
  void reset_parameters();

  /// `W += scale * B @ A` in place on the base weight.
  void merge_into_base();

  double scale() const noexcept { return scale_; }
  const LoRAParameters& params() const noexcept { return params_; }
  /// The wrapped layer as registered under `base`.
  std::shared_ptr<torch::nn::Module> base() const;
  const at::Tensor& base_weight() const;
  const at::Tensor& base_bias() const;

  std::vector<std::string> fresh_state_keys() const override { return {"lora_A.weight", "lora_B.weight"}; }
  void pretty_print(std::ostream& stream) const override;

  torch::nn::Linear lora_A{nullptr};
  torch::nn::Linear lora_B{nullptr};
  torch::nn::Dropout dropout{nullptr};

  // Which kind of base this wraps; exactly one is set.
  std::shared_ptr<d9d::nn::LinearImpl> d9d_base;
  std::shared_ptr<torch::nn::LinearImpl> torch_base;

 private:
  void build(int64_t in_features, int64_t out_features);

  LoRAParameters params_;
  double scale_;
};

TORCH_MODULE(LoRALinear);

}  // namespace d9d::peft
