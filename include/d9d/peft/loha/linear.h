#pragma once

#include <d9d/peft/loha/layer.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// A LoHa wrapper around a linear layer `[out, in]`, as PEFT's `loha.Linear`:
/// `base(x) + F.linear(x, ΔW)` per active adapter, `ΔW = (w1_a @ w1_b) ⊙
/// (w2_a @ w2_b) · alpha / r` with `hada_w1_a`, `hada_w2_a` `[out, r]` and
/// `hada_w1_b`, `hada_w2_b` `[r, in]` (see `DeltaLayer` for dropout and
/// merging, `LoHaLayerImpl` for keys).
class LoHaLinearImpl : public DeltaLinear<LoHaLayerImpl> {
 public:
  LoHaLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoHaParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);
  LoHaLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoHaParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);

  void pretty_print(std::ostream& stream) const override;
};

TORCH_MODULE(LoHaLinear);

}  // namespace d9d::peft
