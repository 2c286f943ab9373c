#pragma once

#include <d9d/peft/delta_layer.h>
#include <d9d/peft/lokr/math.h>
#include <d9d/peft/lokr/options.h>

#include <ATen/core/Tensor.h>

#include <ostream>
#include <string>
#include <vector>

namespace d9d::peft {

/// One named LoKr adapter of a layer whose weight has shape `weight_shape`
/// (`[out, in]`, or a Conv2d's `[out, in/groups, kh, kw]`), with PEFT's keys
/// relative to the layer: `lokr_w1` `[a, c]` or `lokr_w1_a` `[a, r]` and
/// `lokr_w1_b` `[r, c]`; `lokr_w2` `[b, d]` (Conv2d `[b, d, kh, kw]`) or
/// `lokr_w2_a` and `lokr_w2_b` (and on a Conv2d in CP form `lokr_t2`); see
/// `lokr::FactorShape`, which `shape()` returns. The factors it does not hold
/// are undefined tensors.
class LoKrAdapterImpl : public torch::nn::Module {
 public:
  LoKrAdapterImpl(const std::vector<int64_t>& weight_shape, const LoKrParameters& options,
                  const at::TensorOptions& like);
  const LoKrParameters& options() const noexcept { return options_; }
  const lokr::FactorShape& shape() const noexcept { return shape_; }
  double scale() const noexcept { return options_.alpha() / static_cast<double>(options_.r()); }
  /// The left Kronecker factor `[a, c]`: `lokr_w1` or `lokr_w1_a @ lokr_w1_b`.
  at::Tensor w1() const;
  /// The right Kronecker factor `[b, d]` (Conv2d: `[b, d·kh·kw]` flat, or
  /// `[b, d, kh, kw]` whole or in CP form): `lokr_w2`, `lokr_w2_a @ lokr_w2_b`,
  /// or `lokr::cp_weight(lokr_t2, lokr_w2_a, lokr_w2_b)`.
  at::Tensor w2() const;
  /// `kron(w1, w2) · alpha / r` in the weight's shape.
  at::Tensor delta_weight() const;
  /// `delta` as PEFT's rank dropout leaves it in training (unchanged at 0;
  /// the kept rows divided by the kept fraction with `rank_dropout_scale`).
  at::Tensor rank_dropped(const at::Tensor& delta) const;
  void pretty_print(std::ostream& stream) const override;

  at::Tensor lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b, lokr_t2;

 private:
  LoKrParameters options_;
  lokr::FactorShape shape_;
  std::vector<int64_t> weight_shape_;
};

/// What every LoKr layer shares (`LoKrLinearImpl`, `LoKrConv2dImpl`), as
/// PEFT's `LoKrLayer`: a `DeltaLayer` (forward, dropouts, merge) whose
/// adapters are `LoKrAdapterImpl`s. Keys: `base.weight`, `base.bias`, the
/// first adapter's factors on the layer (`lokr_w1` ...), further adapters
/// under `adapters.<name>.`.
class LoKrLayerImpl : public DeltaLayer<LoKrAdapterImpl> {
 public:
  std::string peft_type() const override { return "LOKR"; }
  void add_adapter(const std::string& name, const AdapterOptions& options) override;

  /// The first adapter's factors (the single-adapter layout); undefined where it has none.
  at::Tensor lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b, lokr_t2;

 protected:
  void relayout() override;
  void describe(std::ostream& stream, const LoKrAdapterImpl& adapter) const override;
};

}  // namespace d9d::peft
