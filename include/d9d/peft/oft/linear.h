#pragma once

#include <d9d/peft/oft/layer.h>
#include <d9d/peft/wrapped_linear.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// An OFT wrapper around a linear layer, as PEFT 0.21's `oft.Linear`: each
/// active adapter rotates the input in turn, block by block
/// (`x ← x · R`), and the base computes on the result. Merging, keys: see
/// `OFTLayerImpl` (the rotated dimension is `in`).
class OFTLinearImpl : public OFTLayerImpl, public WrappedLinear {
 public:
  OFTLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const OFTParameters& options,
                const std::string& adapter_name = kDefaultAdapterName);
  OFTLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const OFTParameters& options,
                const std::string& adapter_name = kDefaultAdapterName);

  at::Tensor forward(const at::Tensor& input) override;
  torch::nn::AnyModule unwrap() override;
  void pretty_print(std::ostream& stream) const override;

 protected:
  const at::Tensor& adapted_weight() const override { return base_weight(); }
};

TORCH_MODULE(OFTLinear);

}  // namespace d9d::peft
