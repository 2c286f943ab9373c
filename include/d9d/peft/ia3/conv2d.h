#pragma once

#include <d9d/nn/conv2d.h>
#include <d9d/peft/ia3/layer.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// An (IA)³ wrapper around a `d9d::nn::Conv2d`, as PEFT's `ia3.Conv2d`:
/// `base(x) * l` per output channel (the bias scaled too), or on a
/// feed-forward layer `base(x * l)` per input channel; several active
/// adapters multiply their vectors. Every Conv2d is adaptable: grouped,
/// dilated, any padding mode (the scaling commutes with the padding).
///
/// Merging multiplies the weight's output channels (and the bias) by `l`, or
/// on a feed-forward layer its input channels, each group's slice of `l` for
/// that group's filters; unmerging divides by `l + 1e-8`, as PEFT does.
///
/// Keys: `base.weight`, `base.bias`, the first adapter's `ia3_l`
/// (`[1, out, 1, 1]`, or `[1, in, 1, 1]` on a feed-forward layer), further
/// adapters under `adapters.<name>.ia3_l`. Whether the layer is feed-forward
/// is fixed by its first adapter; every adapter agrees.
class IA3Conv2dImpl : public IA3LayerImpl {
 public:
  /// Wraps `base` with one adapter, `adapter_name`, active.
  IA3Conv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base, const IA3Parameters& options,
                const std::string& adapter_name = kDefaultAdapterName);

  at::Tensor forward(const at::Tensor& input) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  torch::nn::AnyModule unwrap() override;
  void pretty_print(std::ostream& stream) const override;

  std::shared_ptr<d9d::nn::Conv2dImpl> base;

 protected:
  std::vector<int64_t> vector_shape() const override;
  at::TensorOptions weight_options() const override { return base->weight.options(); }
};

TORCH_MODULE(IA3Conv2d);

}  // namespace d9d::peft
