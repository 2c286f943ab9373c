#pragma once

#include <d9d/peft/loha/layer.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// A LoHa wrapper around a `d9d::nn::Conv2d`, as PEFT's `loha.Conv2d`:
/// `base(x) + conv2d(x, ΔW)` per active adapter, with the base's stride,
/// padding, dilation and groups; `ΔW` has the weight's shape
/// `[out, in/groups, kh, kw]`. Flat factors (`hada_w1_a` `[out, r]`,
/// `hada_w1_b` `[r, in/groups·kh·kw]`, ...) or, with `use_effective_conv2d`
/// and a kernel larger than 1×1, PEFT's CP form (`hada_t1`, `hada_t2`
/// `[r, r, kh, kw]`, `hada_w1_a` `[r, out]`, `hada_w1_b` `[r, in/groups]`,
/// ...); see `LoHaAdapterImpl`. Grouped and dilated convolutions are
/// adaptable; a padding mode other than zeros is refused (PEFT pads the
/// delta's input with zeros, so a merge would change the outputs).
/// Dropout and merging as `DeltaLayer`, keys as `LoHaLayerImpl`.
class LoHaConv2dImpl : public DeltaConv2d<LoHaLayerImpl> {
 public:
  /// Wraps `base` with one adapter, `adapter_name`, active.
  LoHaConv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base, const LoHaParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);

  void pretty_print(std::ostream& stream) const override;
};

TORCH_MODULE(LoHaConv2d);

}  // namespace d9d::peft
