#pragma once

#include <d9d/peft/delta_layer.h>
#include <d9d/peft/loha/options.h>

#include <ATen/core/Tensor.h>

#include <ostream>
#include <string>
#include <vector>

namespace d9d::peft {

/// One named LoHa adapter of a layer whose weight has shape `weight_shape`
/// (PEFT's keys relative to the layer):
/// - flat (a linear layer `[out, in]`; a Conv2d `[out, in/groups, kh, kw]`
///   without `use_effective_conv2d`, or with a 1×1 kernel): `hada_w1_a`,
///   `hada_w2_a` `[out, r]`, `hada_w1_b`, `hada_w2_b` `[r, cols]` where
///   `cols` is the product of the weight's other dimensions;
/// - CP (a Conv2d with `use_effective_conv2d` and a kernel larger than 1×1):
///   `hada_t1`, `hada_t2` `[r, r, kh, kw]`, `hada_w1_a`, `hada_w2_a`
///   `[r, out]`, `hada_w1_b`, `hada_w2_b` `[r, in/groups]`.
class LoHaAdapterImpl : public torch::nn::Module {
 public:
  LoHaAdapterImpl(const std::vector<int64_t>& weight_shape, const LoHaParameters& options,
                  const at::TensorOptions& like);
  const LoHaParameters& options() const noexcept { return options_; }
  double scale() const noexcept { return options_.alpha() / static_cast<double>(options_.r()); }
  /// Whether the kernel is factored in CP form (`hada_t1`, `hada_t2` are defined).
  bool cp() const noexcept { return hada_t1.defined(); }
  /// `ΔW` in the weight's shape: `(w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r`
  /// reshaped, or the CP products' Hadamard product times `alpha / r`.
  at::Tensor delta_weight() const;
  /// `delta` as PEFT's rank dropout leaves it in training (unchanged at 0).
  at::Tensor rank_dropped(const at::Tensor& delta) const;
  void pretty_print(std::ostream& stream) const override;

  at::Tensor hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b;
  /// Undefined unless `cp()`.
  at::Tensor hada_t1, hada_t2;

 private:
  LoHaParameters options_;
  std::vector<int64_t> weight_shape_;
};

/// What every LoHa layer shares (`LoHaLinearImpl`, `LoHaConv2dImpl`), as
/// PEFT's `LoHaLayer`: a `DeltaLayer` (forward, dropouts, merge) whose
/// adapters are `LoHaAdapterImpl`s. Keys: `base.weight`, `base.bias`, the
/// first adapter's factors on the layer (`hada_w1_a` ...), further adapters
/// under `adapters.<name>.`.
class LoHaLayerImpl : public DeltaLayer<LoHaAdapterImpl> {
 public:
  std::string peft_type() const override { return "LOHA"; }
  void add_adapter(const std::string& name, const AdapterOptions& options) override;

  /// The first adapter's factors (the single-adapter layout); `hada_t1` and
  /// `hada_t2` only in CP form.
  at::Tensor hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1, hada_t2;

 protected:
  void relayout() override;
  void describe(std::ostream& stream, const LoHaAdapterImpl& adapter) const override;
};

}  // namespace d9d::peft
