#pragma once

#include <d9d/nn/conv2d.h>
#include <d9d/peft/oft/layer.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// An OFT wrapper around a `d9d::nn::Conv2d` with groups 1, dilation 1 and a
/// square kernel, as PEFT 0.21's `oft.Conv2d`: the rotated dimension is a
/// filter's `in·k·k` values, in the weight's order (channel, then kernel row
/// and column), and the layer computes `conv(x, W')` where `W'` is the
/// weight with each filter `f` rotated, `f ← f·Rᵀ` (several adapters in
/// PEFT's order, the first applied to the input last): exactly what merging
/// writes (PEFT's `merge_and_unload`).
///
/// On a 1×1 kernel that is also PEFT's unmerged forward (the input rotated
/// per pixel). On larger kernels PEFT 0.21's unmerged forward is not: it
/// rotates overlapping input patches and sums them back with `F.fold`, so
/// even a fresh (identity) adapter changes its outputs, and its merged and
/// unmerged models differ. This layer is the merged model; see docs/conv.md.
class OFTConv2dImpl : public OFTLayerImpl {
 public:
  /// Wraps `base` with one adapter, `adapter_name`, active; `PeftError` for
  /// a base `oft_conv2d_refusal` refuses.
  OFTConv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base, const OFTParameters& options,
                const std::string& adapter_name = kDefaultAdapterName);

  at::Tensor forward(const at::Tensor& input) override;
  torch::nn::AnyModule unwrap() override;
  void pretty_print(std::ostream& stream) const override;

  std::shared_ptr<d9d::nn::Conv2dImpl> base;

 protected:
  const at::Tensor& adapted_weight() const override { return base->weight; }
};

TORCH_MODULE(OFTConv2d);

/// Why OFT cannot adapt Conv2d `name`, or empty: groups other than 1 (PEFT
/// views the weight as `[out, in·k·k]`, which a grouped weight is not),
/// dilation (PEFT refuses it), or a kernel that is not square (PEFT sizes the
/// rotation as `in·k[0]²`).
std::string oft_conv2d_refusal(const std::string& name, const torch::nn::Conv2dOptions& options);

}  // namespace d9d::peft
