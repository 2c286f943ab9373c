#pragma once

#include <d9d/peft/adapter_set.h>
#include <d9d/peft/lokr/math.h>
#include <d9d/peft/lokr/options.h>
#include <d9d/peft/wrapped_linear.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// One named LoKr adapter of a linear layer `[out, in]`, with PEFT's keys
/// relative to the layer: `lokr_w1` `[a, c]` or `lokr_w1_a` `[a, r]` and
/// `lokr_w1_b` `[r, c]`; `lokr_w2` `[b, d]` or `lokr_w2_a` `[b, r]` and
/// `lokr_w2_b` `[r, d]` (`lokr::linear_shape` says which). The factors it
/// does not hold are undefined tensors.
class LoKrLinearAdapterImpl : public torch::nn::Module {
 public:
  LoKrLinearAdapterImpl(int64_t in_features, int64_t out_features, const LoKrParameters& options,
                        const at::TensorOptions& like);
  const LoKrParameters& options() const noexcept { return options_; }
  const lokr::LinearShape& shape() const noexcept { return shape_; }
  double scale() const noexcept { return options_.alpha() / static_cast<double>(options_.r()); }
  /// The left Kronecker factor `[a, c]`: `lokr_w1` or `lokr_w1_a @ lokr_w1_b`.
  at::Tensor w1() const;
  /// The right Kronecker factor `[b, d]`: `lokr_w2` or `lokr_w2_a @ lokr_w2_b`.
  at::Tensor w2() const;
  /// `kron(w1, w2) · alpha / r`, `[out, in]`.
  at::Tensor delta_weight() const;
  void pretty_print(std::ostream& stream) const override;

  at::Tensor lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b;

 private:
  LoKrParameters options_;
  lokr::LinearShape shape_;
};

/// A LoKr wrapper around a linear layer, as PEFT's `lokr.Linear`: each
/// active adapter builds its `ΔW` in forward and adds `F.linear(x, ΔW)` to
/// `base(x)`. In training, `module_dropout` skips an adapter for a call and
/// `rank_dropout` drops rows of `ΔW`, drawing from LibTorch's default
/// generator in PEFT's order. Merging adds `ΔW` to the weight (the bias is
/// not touched). Keys: `base.weight`, `base.bias`, the first adapter's
/// `lokr_w1` ..., further adapters under `adapters.<name>.`.
class LoKrLinearImpl : public AdapterSetLayer<LoKrLinearAdapterImpl>, public WrappedLinear {
 public:
  LoKrLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoKrParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);
  LoKrLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoKrParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);

  std::string peft_type() const override { return "LOKR"; }
  at::Tensor forward(const at::Tensor& input) override;

  void add_adapter(const std::string& name, const AdapterOptions& options) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  at::Tensor delta_weight(const std::string& name) const override;
  torch::nn::AnyModule unwrap() override;
  void pretty_print(std::ostream& stream) const override;

  /// The first adapter's factors (the single-adapter layout); undefined where it has none.
  at::Tensor lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b;

 protected:
  void relayout() override;
  void describe(std::ostream& stream, const LoKrLinearAdapterImpl& adapter) const override;
};

TORCH_MODULE(LoKrLinear);

}  // namespace d9d::peft
