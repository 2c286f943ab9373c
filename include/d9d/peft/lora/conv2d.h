#pragma once

#include <d9d/nn/conv2d.h>
#include <d9d/peft/lora/lora_layer.h>

#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// One named LoRA adapter of a Conv2d layer, laid out as PEFT does:
/// `lora_A` a Conv2d(in, r, kernel, stride, padding, bias=false) (weight
/// `[r, in, kh, kw]`), `lora_B` a 1x1 Conv2d(r, out, bias=false) (weight
/// `[out, r, 1, 1]`), `dropout`, and with DoRA `lora_magnitude_vector`
/// `[1, out, 1, 1]`.
class LoRAConv2dAdapterImpl : public torch::nn::Module {
 public:
  LoRAConv2dAdapterImpl(const torch::nn::Conv2dOptions& base, const LoRAParameters& options,
                        const at::TensorOptions& like);

  const LoRAParameters& options() const noexcept { return options_; }
  double scale() const noexcept { return scale_; }
  void pretty_print(std::ostream& stream) const override;

  torch::nn::Conv2d lora_A{nullptr};
  torch::nn::Conv2d lora_B{nullptr};
  torch::nn::Dropout dropout{nullptr};
  /// DoRA only: `[1, out, 1, 1]`.
  at::Tensor lora_magnitude_vector;
  /// DoRA while merged: the per-channel norms the merge divided by (for unmerging).
  at::Tensor merged_norm;

 private:
  LoRAParameters options_;
  double scale_;
};

/// A LoRA wrapper around a `d9d::nn::Conv2d`, as PEFT's `lora.Conv2d`:
/// `base(x) + sum over active adapters of scale * lora_B(lora_A(dropout(x)))`,
/// `scale = alpha / r` (`alpha / sqrt(r)` with rsLoRA). A DoRA adapter
/// rescales each output channel by `m / ||W + scale * ΔW||` (the norm over
/// the channel's input and kernel axes, detached): `(m/n - 1) * conv(x, W) +
/// m/n * scale * lora_B(lora_A(x))` on top of the base output.
///
/// Merge: `W += scale * ΔW` with PEFT's conv delta (`conv2d(A^T, B)^T`, or a
/// matrix product for a 1x1 kernel); DoRA `W' = m / ||W + ΔW|| * (W + ΔW)`.
///
/// Keys: the base is `base` (`base.weight`, `base.bias`); the first adapter's
/// `lora_A.weight`, `lora_B.weight` and DoRA's `lora_magnitude_vector` on the
/// wrapper, further adapters under `adapters.<name>.`.
///
/// PEFT builds `lora_A` without the base's dilation and padding mode and
/// cannot merge grouped convolutions, so a base with `groups != 1`, a
/// padding mode other than zeros, or a dilation with a kernel larger than 1x1
/// is refused (`PeftError`).
class LoRAConv2dImpl : public LoRALayer<LoRAConv2dAdapterImpl> {
 public:
  /// Wraps `base` with one adapter, `adapter_name`, active.
  LoRAConv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base, const LoRAParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);

  at::Tensor forward(const at::Tensor& input) override;

  void add_adapter(const std::string& name, const AdapterOptions& options) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  /// `scale * ΔW` `[out, in, kh, kw]` (not for DoRA).
  at::Tensor delta_weight(const std::string& name) const override;
  torch::nn::AnyModule unwrap() override;
  void pretty_print(std::ostream& stream) const override;

  std::shared_ptr<d9d::nn::Conv2dImpl> base;
  /// The first adapter's modules (the single-adapter layout).
  torch::nn::Conv2d lora_A{nullptr};
  torch::nn::Conv2d lora_B{nullptr};
  torch::nn::Dropout dropout{nullptr};
  /// DoRA only: `[1, out, 1, 1]`.
  at::Tensor lora_magnitude_vector;

 protected:
  void relayout() override;
  void reset_adapter(LoRAConv2dAdapterImpl& adapter) override;
  void reset_adapter_magnitude(LoRAConv2dAdapterImpl& adapter) override;

 private:
  at::Tensor dora_scale(const LoRAConv2dAdapterImpl& adapter) const;
};

TORCH_MODULE(LoRAConv2d);

/// Why LoRA cannot adapt the Conv2d layer `name` with `options`, or empty
/// when it can: the messages of the refusals `LoRAConv2dImpl` makes.
std::string lora_conv2d_refusal(const std::string& name, const torch::nn::Conv2dOptions& options);

}  // namespace d9d::peft
