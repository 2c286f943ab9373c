#pragma once

#include <d9d/peft/lokr/layer.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// A LoKr wrapper around a linear layer `[out, in]`, as PEFT's `lokr.Linear`:
/// `base(x) + F.linear(x, ΔW)` per active adapter, `ΔW = kron(w1, w2) ·
/// alpha / r` with `w1` `[a, c]` and `w2` `[b, d]` whole or factored (see
/// `LoKrAdapterImpl`, `DeltaLayer` for dropout and merging, `LoKrLayerImpl`
/// for keys).
class LoKrLinearImpl : public DeltaLinear<LoKrLayerImpl> {
 public:
  LoKrLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoKrParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);
  LoKrLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoKrParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);

  void pretty_print(std::ostream& stream) const override;
};

TORCH_MODULE(LoKrLinear);

}  // namespace d9d::peft
