#pragma once

#include <d9d/nn/grouped_linear.h>
#include <d9d/peft/lora/lora_layer.h>

#include <torch/nn/modules/dropout.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// One named LoRA adapter of a grouped expert layer, as d9d's Python
/// `LoRAGroupedLinear`: `lora_A` a `GroupedLinear(groups, in, r)` (weight
/// `[G, in, r]`), `lora_B` a `GroupedLinear(groups, r, out)` (`[G, r, out]`),
/// and `dropout`. Its parameter names are the adapter's keys relative to the layer.
class LoRAGroupedLinearAdapterImpl : public torch::nn::Module {
 public:
  LoRAGroupedLinearAdapterImpl(int64_t groups, int64_t in_features, int64_t out_features,
                               const LoRAParameters& options, const at::TensorOptions& like);

  const LoRAParameters& options() const noexcept { return options_; }
  double scale() const noexcept { return scale_; }
  void pretty_print(std::ostream& stream) const override;

  d9d::nn::GroupedLinear lora_A{nullptr};
  d9d::nn::GroupedLinear lora_B{nullptr};
  torch::nn::Dropout dropout{nullptr};

 private:
  LoRAParameters options_;
  double scale_;
};

/// The part of `LoRAGroupedLinearImpl` that refuses one-input calls: every
/// adapter layer is a `d9d::nn::LayerOverride`, but a grouped layer needs its
/// group sizes (`PeftError` saying so). Kept apart so that the wrapper's own
/// `forward` is the grouped one alone (what `AnyModule` and `TORCH_MODULE` call).
class LoRAGroupedLayer : public LoRALayer<LoRAGroupedLinearAdapterImpl> {
 public:
  at::Tensor forward(const at::Tensor& input) override;
};

/// A LoRA wrapper around a `d9d::nn::GroupedLinear` (the experts of a
/// mixture-of-experts block), as d9d's Python `LoRAGroupedLinear`:
/// `base(x, group_sizes) + sum over active adapters of
/// scale * lora_B(lora_A(dropout(x), group_sizes), group_sizes)`, so each
/// expert gets its own rank-r update and no `[G, in, out]` delta is built.
/// `scale = alpha / r` (`alpha / sqrt(r)` with rsLoRA). Merge:
/// `W += scale * bmm(A, B)`.
///
/// Keys: the base is `base` (`base.weight` `[G, in, out]`); the first
/// adapter's `lora_A.weight` `[G, in, r]` and `lora_B.weight` `[G, r, out]` on
/// the wrapper, further adapters under `adapters.<name>.` (see `LoRALayer`).
/// Init: A as `GroupedLinear` (uniform in `[-1/sqrt(in), 1/sqrt(in)]`), B zeros.
///
/// Mixed batches (`MixedBatchScope`) name an adapter per row of this layer's
/// input, that is per routed token. DoRA is refused (`PeftError`).
class LoRAGroupedLinearImpl : public LoRAGroupedLayer, public d9d::nn::GroupedLayerOverride {
 public:
  /// Wraps `base` with one adapter, `adapter_name`, active.
  LoRAGroupedLinearImpl(std::shared_ptr<d9d::nn::GroupedLinearImpl> base, const LoRAParameters& options,
                        const std::string& adapter_name = kDefaultAdapterName);

  at::Tensor forward(const at::Tensor& input, const at::Tensor& group_sizes) override;

  void add_adapter(const std::string& name, const AdapterOptions& options) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  /// `scale * bmm(A, B)`, `[G, in, out]`.
  at::Tensor delta_weight(const std::string& name) const override;
  torch::nn::AnyModule unwrap() override;
  bool supports_mixed_batch() const override { return true; }
  void pretty_print(std::ostream& stream) const override;

  std::shared_ptr<d9d::nn::GroupedLinearImpl> base;
  /// The first adapter's modules (the single-adapter layout).
  d9d::nn::GroupedLinear lora_A{nullptr};
  d9d::nn::GroupedLinear lora_B{nullptr};
  torch::nn::Dropout dropout{nullptr};

 protected:
  void relayout() override;
  void reset_adapter(LoRAGroupedLinearAdapterImpl& adapter) override;
  void reset_adapter_magnitude(LoRAGroupedLinearAdapterImpl& adapter) override;

 private:
  at::Tensor forward_mixed(const at::Tensor& input, const std::vector<int64_t>& sizes, at::Tensor out);
};

TORCH_MODULE(LoRAGroupedLinear);

/// `PeftError` naming `layer` (its qualified name, or a description): DoRA
/// has no grouped form here.
[[noreturn]] void refuse_grouped_dora(const std::string& layer);

}  // namespace d9d::peft
