#pragma once

#include <d9d/peft/lokr/layer.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// A LoKr wrapper around a `d9d::nn::Conv2d`, as PEFT's `lokr.Conv2d`:
/// `base(x) + conv2d(x, ΔW)` per active adapter, with the base's stride,
/// padding, dilation and groups; `ΔW = kron(w1, w2) · alpha / r` in the
/// weight's shape `[out, in/groups, kh, kw]`, `w2` carrying the kernel
/// (whole `[b, d, kh, kw]`, factored flat, or with `use_effective_conv2d` on
/// a kernel larger than 1×1 in PEFT's CP form with `lokr_t2`; see
/// `lokr::FactorShape`). Grouped and dilated convolutions are adaptable; a
/// padding mode other than zeros is refused (PEFT pads the delta's input
/// with zeros, so a merge would change the outputs). Dropout and merging as
/// `DeltaLayer`, keys as `LoKrLayerImpl`.
class LoKrConv2dImpl : public DeltaConv2d<LoKrLayerImpl> {
 public:
  /// Wraps `base` with one adapter, `adapter_name`, active.
  LoKrConv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base, const LoKrParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);

  void pretty_print(std::ostream& stream) const override;
};

TORCH_MODULE(LoKrConv2d);

}  // namespace d9d::peft
