#pragma once

#include <d9d/peft/ia3/layer.h>
#include <d9d/peft/wrapped_linear.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// An (IA)³ wrapper around a linear layer, as PEFT's `ia3.Linear`:
/// `base(x) * l` (the bias scaled too), or on a feed-forward layer
/// `base(x * l)`; several active adapters multiply their vectors. Merging
/// multiplies the weight's rows (columns on a feed-forward layer) and the bias
/// by `l`. Keys: `base.weight`, `base.bias`, the first adapter's `ia3_l`
/// (`[out, 1]`, or `[1, in]` on a feed-forward layer), further adapters under
/// `adapters.<name>.ia3_l`. Whether the layer is feed-forward is fixed by its
/// first adapter; every adapter agrees.
class IA3LinearImpl : public IA3LayerImpl, public WrappedLinear {
 public:
  IA3LinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const IA3Parameters& options,
                const std::string& adapter_name = kDefaultAdapterName);
  IA3LinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const IA3Parameters& options,
                const std::string& adapter_name = kDefaultAdapterName);

  at::Tensor forward(const at::Tensor& input) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  torch::nn::AnyModule unwrap() override;
  void pretty_print(std::ostream& stream) const override;

 protected:
  std::vector<int64_t> vector_shape() const override;
  at::TensorOptions weight_options() const override { return base_weight().options(); }
};

TORCH_MODULE(IA3Linear);

}  // namespace d9d::peft
