#pragma once

#include <d9d/nn/conv2d.h>
#include <d9d/peft/adapter_set.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/wrapped_linear.h>

#include <ATen/core/Tensor.h>
#include <torch/nn/modules/container/any.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>

namespace d9d::peft {

/// Why `method` cannot adapt Conv2d `name` with a `DeltaConv2d`, or empty:
/// PEFT convolves the input with `ΔW` padding with zeros, so a base with
/// another padding mode would get an adapter term that does not line up with
/// its own, and a merge would change the outputs.
std::string zero_padded_delta_refusal(const std::string& method, const std::string& name,
                                      const torch::nn::Conv2dOptions& options);
/// The same for `method`, as `with_conv2d` takes a refusal.
inline std::function<std::string(const std::string& name, const torch::nn::Conv2dOptions& options)>
zero_padded_delta_refusal(std::string method) {
  return [method = std::move(method)](const std::string& name, const torch::nn::Conv2dOptions& options) {
    return zero_padded_delta_refusal(method, name, options);
  };
}

/// `weight + delta` in `weight`'s dtype (PEFT's `weight.data += delta`): the
/// merge of every `DeltaLayer`, in the model and offline.
at::Tensor added_delta(const at::Tensor& weight, const at::Tensor& delta);
/// `weight - delta` in `weight`'s dtype: the unmerge.
at::Tensor subtracted_delta(const at::Tensor& weight, const at::Tensor& delta);

/// The layers whose every active adapter adds the layer's own operation of
/// the input with a weight delta, `base(x) + op(x, ΔW)` (LoHa, LoKr: PEFT's
/// `LycorisLayer`). In training, per adapter and call in PEFT's order, one
/// `rand(1)` draw skips the adapter unless it exceeds `module_dropout`, and
/// the adapter's rank dropout masks ΔW. Merging adds ΔW to the weight in the
/// weight's dtype (the bias is not touched); unmerging subtracts it.
///
/// The forward is PEFT's sum computed as one operation: `op(x, W + ΣΔW) + b`
/// where the input, the weight and every ΔW share a dtype (one product or
/// convolution instead of one per adapter plus the base's; the same numbers
/// to float rounding), else PEFT's `base(x) + Σ op(x, ΔW)` in ΔW's dtype.
///
/// `Adapter` has `delta_weight()` (ΔW in the weight's shape),
/// `options().module_dropout()` and `rank_dropped(delta)` (ΔW as rank dropout
/// leaves it in training). A method's layer base derives from this and adds
/// `add_adapter`, `relayout`, `describe`, `peft_type`; `DeltaLinear` and
/// `DeltaConv2d` add the base layer.
template <typename Adapter>
class DeltaLayer : public AdapterSetLayer<Adapter> {
 public:
  at::Tensor forward(const at::Tensor& input) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  at::Tensor delta_weight(const std::string& name) const override;

 protected:
  /// The base layer's weight, which merging changes in place.
  virtual const at::Tensor& adapted_weight() const = 0;
  /// The base layer's output.
  virtual at::Tensor base_forward(const at::Tensor& input) const = 0;
  /// The layer's operation of `input` with weight `delta` and no bias.
  virtual at::Tensor delta_forward(const at::Tensor& input, const at::Tensor& delta) const = 0;
  /// The layer's operation of `input` with weight `weight` and the base's bias.
  virtual at::Tensor weighted_forward(const at::Tensor& input, const at::Tensor& weight) const = 0;
};

/// `Layer` (a `DeltaLayer`) around a linear layer: `op` is `F.linear`.
template <typename Layer>
class DeltaLinear : public Layer, public WrappedLinear {
 public:
  torch::nn::AnyModule unwrap() override { return this->unwrap_base(); }

 protected:
  explicit DeltaLinear(std::shared_ptr<d9d::nn::LinearImpl> base) : WrappedLinear(std::move(base), *this) {}
  explicit DeltaLinear(std::shared_ptr<torch::nn::LinearImpl> base) : WrappedLinear(std::move(base), *this) {}
  const at::Tensor& adapted_weight() const override { return this->base_weight(); }
  at::Tensor base_forward(const at::Tensor& input) const override;
  at::Tensor delta_forward(const at::Tensor& input, const at::Tensor& delta) const override;
  at::Tensor weighted_forward(const at::Tensor& input, const at::Tensor& weight) const override;
};

/// `Layer` (a `DeltaLayer`) around a `d9d::nn::Conv2d`: `op` is the
/// convolution with the base's stride, padding, dilation and groups, as
/// PEFT's `F.conv2d(x, ΔW, ...)`. A padding mode other than zeros is refused
/// (`zero_padded_delta_refusal`).
template <typename Layer>
class DeltaConv2d : public Layer {
 public:
  torch::nn::AnyModule unwrap() override {
    base->clear_override();
    return torch::nn::AnyModule(base);
  }

  std::shared_ptr<d9d::nn::Conv2dImpl> base;

 protected:
  /// `method` names the method in errors (`"LoHa"`).
  DeltaConv2d(std::shared_ptr<d9d::nn::Conv2dImpl> base_, const char* method) : base(std::move(base_)) {
    if (!base) throw PeftError(std::string(method) + " Conv2d layer: the base layer is null");
    if (std::string why = zero_padded_delta_refusal(method, "the base layer", base->options); !why.empty()) {
      throw PeftError(why);
    }
    this->register_module("base", base);
  }
  const at::Tensor& adapted_weight() const override { return base->weight; }
  at::Tensor base_forward(const at::Tensor& input) const override { return base->forward_base(input); }
  at::Tensor delta_forward(const at::Tensor& input, const at::Tensor& delta) const override {
    return base->convolve(input, delta, at::Tensor());
  }
  at::Tensor weighted_forward(const at::Tensor& input, const at::Tensor& weight) const override {
    return base->convolve(input, weight, base->bias);
  }
};

}  // namespace d9d::peft
