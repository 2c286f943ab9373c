#pragma once

#include <d9d/peft/loha/layer.h>
#include <d9d/peft/wrapped_linear.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// A LoHa wrapper around a linear layer `[out, in]`, as PEFT's `loha.Linear`:
/// `base(x) + F.linear(x, ΔW)` per active adapter, `ΔW = (w1_a @ w1_b) ⊙
/// (w2_a @ w2_b) · alpha / r` with `hada_w1_a`, `hada_w2_a` `[out, r]` and
/// `hada_w1_b`, `hada_w2_b` `[r, in]` (see `LoHaLayerImpl` for dropout,
/// merging and keys).
class LoHaLinearImpl : public LoHaLayerImpl, public WrappedLinear {
 public:
  LoHaLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoHaParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);
  LoHaLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoHaParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);

  torch::nn::AnyModule unwrap() override;
  void pretty_print(std::ostream& stream) const override;

 protected:
  const at::Tensor& adapted_weight() const override { return base_weight(); }
  at::Tensor base_forward(const at::Tensor& input) const override;
  at::Tensor delta_forward(const at::Tensor& input, const at::Tensor& delta) const override;
};

TORCH_MODULE(LoHaLinear);

}  // namespace d9d::peft
