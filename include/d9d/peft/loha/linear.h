#pragma once

#include <d9d/peft/adapter_set.h>
#include <d9d/peft/loha/options.h>
#include <d9d/peft/wrapped_linear.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// One named LoHa adapter of a linear layer `[out, in]`: `hada_w1_a`,
/// `hada_w2_a` `[out, r]` and `hada_w1_b`, `hada_w2_b` `[r, in]` (PEFT's keys
/// relative to the layer).
class LoHaLinearAdapterImpl : public torch::nn::Module {
 public:
  LoHaLinearAdapterImpl(int64_t in_features, int64_t out_features, const LoHaParameters& options,
                        const at::TensorOptions& like);
  const LoHaParameters& options() const noexcept { return options_; }
  double scale() const noexcept { return options_.alpha() / static_cast<double>(options_.r()); }
  /// `(w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r`.
  at::Tensor delta_weight() const;
  void pretty_print(std::ostream& stream) const override;

  at::Tensor hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b;

 private:
  LoHaParameters options_;
};

/// A LoHa wrapper around a linear layer, as PEFT's `loha.Linear`: each active
/// adapter builds its `ΔW` in forward and adds `F.linear(x, ΔW)` to
/// `base(x)`. In training, `module_dropout` skips an adapter for a call and
/// `rank_dropout` drops rows of `ΔW`, drawing from LibTorch's default
/// generator in PEFT's order. Merging adds `ΔW` to the weight (the bias is
/// not touched). Keys: `base.weight`, `base.bias`, the first adapter's
/// `hada_w1_a` ..., further adapters under `adapters.<name>.`.
class LoHaLinearImpl : public AdapterSetLayer<LoHaLinearAdapterImpl>, public WrappedLinear {
 public:
  LoHaLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoHaParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);
  LoHaLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoHaParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);

  std::string peft_type() const override { return "LOHA"; }
  at::Tensor forward(const at::Tensor& input) override;

  void add_adapter(const std::string& name, const AdapterOptions& options) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  at::Tensor delta_weight(const std::string& name) const override;
  torch::nn::AnyModule unwrap() override;
  void pretty_print(std::ostream& stream) const override;

  /// The first adapter's factors (the single-adapter layout).
  at::Tensor hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b;

 protected:
  void relayout() override;
  void describe(std::ostream& stream, const LoHaLinearAdapterImpl& adapter) const override;
};

TORCH_MODULE(LoHaLinear);

}  // namespace d9d::peft
