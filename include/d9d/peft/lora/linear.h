#pragma once

#include <d9d/nn/linear.h>
#include <d9d/peft/lora/lora_layer.h>
#include <d9d/peft/mixed_batch.h>
#include <d9d/peft/wrapped_linear.h>

#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// One named LoRA adapter of a linear layer: `lora_A` `[r, in]`, `lora_B`
/// `[out, r]`, `dropout`, and with DoRA `lora_magnitude_vector` `[out]`.
/// Its parameter names are PEFT's file keys relative to the layer.
class LoRALinearAdapterImpl : public torch::nn::Module {
 public:
  LoRALinearAdapterImpl(int64_t in_features, int64_t out_features, const LoRAParameters& options,
                        const at::TensorOptions& like);

  const LoRAParameters& options() const noexcept { return options_; }
  double scale() const noexcept { return scale_; }
  void pretty_print(std::ostream& stream) const override;
  /// Zero-pads `lora_A` and `lora_B` to rank `r` (not below the current
  /// one) keeping the parameters' identity and the scale; the options then
  /// say rank `r` and the alpha that gives that scale. `prepare_for_hotswap`
  /// (defined in src/peft/lora/hotswap.cpp).
  void pad_rank(int64_t r);

  torch::nn::Linear lora_A{nullptr};
  torch::nn::Linear lora_B{nullptr};
  torch::nn::Dropout dropout{nullptr};
  /// DoRA only: `[out]`.
  at::Tensor lora_magnitude_vector;
  /// DoRA while merged: the row norms the merge divided by (for unmerging).
  at::Tensor merged_norm;
  /// PiSSA and OLoRA: the factors at initialisation (float32, not
  /// parameters): the base holds `W - scale * initial_B @ initial_A`. Empty
  /// when unknown (the adapter's factors and the residual base came from a
  /// checkpoint).
  at::Tensor initial_A, initial_B;
  /// PiSSA and OLoRA: whether the base weight holds the residual.
  bool base_is_residual = false;

 private:
  LoRAParameters options_;
  double scale_;
};

/// A LoRA wrapper around a linear layer:
/// `base(x) + sum over active adapters of scale * lora_B(lora_A(dropout(x)))`,
/// `scale = alpha / r` (`alpha / sqrt(r)` with rsLoRA). A DoRA adapter
/// rescales per output row: `m / ||W + scale * B A||_row * (W + scale * B A) x + bias`,
/// the norm detached from the graph as PEFT does.
///
/// Keys: the base is `base` (`base.weight`, `base.bias`); the first adapter's
/// `lora_A.weight` `[r, in]`, `lora_B.weight` `[out, r]`, DoRA's
/// `lora_magnitude_vector` `[out]` on the wrapper, further adapters under
/// `adapters.<name>.` (see `LoRALayer`).
///
/// Adapters are created on the base weight's device and dtype. The base is a
/// `d9d::nn::Linear` (its calls are routed here) or a `torch::nn::Linear` held
/// by a `Sequential`, `ModuleList` or `ModuleDict`.
class LoRALinearImpl : public LoRALayer<LoRALinearAdapterImpl>, public WrappedLinear {
 public:
  /// Wraps `base` with one adapter, `adapter_name`, active.
  LoRALinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoRAParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);
  LoRALinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoRAParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);

  at::Tensor forward(const at::Tensor& input) override;

  void add_adapter(const std::string& name, const AdapterOptions& options) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  /// `scale * B @ A` (not for DoRA).
  at::Tensor delta_weight(const std::string& name) const override;
  /// Deleting a PiSSA or OLoRA adapter (or unwrapping the layer) adds its
  /// initial part back to the base weight (`+= scale * B0 @ A0`): the base is
  /// the original again, within rounding.
  void delete_adapter(const std::string& name) override;
  torch::nn::AnyModule unwrap() override;
  /// Not with a PiSSA or OLoRA adapter: rows without it would need the original base.
  bool supports_mixed_batch() const override;

  void pretty_print(std::ostream& stream) const override;

  /// The first adapter's modules (the single-adapter layout).
  torch::nn::Linear lora_A{nullptr};
  torch::nn::Linear lora_B{nullptr};
  torch::nn::Dropout dropout{nullptr};
  /// DoRA only: `[out]`.
  at::Tensor lora_magnitude_vector;

 protected:
  void relayout() override;
  void reset_adapter(LoRALinearAdapterImpl& adapter) override;
  void reset_adapter_magnitude(LoRALinearAdapterImpl& adapter) override;
  void base_reloaded(LoRALinearAdapterImpl& adapter, bool factors_loaded) override;

 private:
  /// PiSSA and OLoRA: adds the initial part back to the base weight.
  void restore_base(LoRALinearAdapterImpl& adapter);
  /// `scale * B0 A0 x` of an unmerged PiSSA or OLoRA adapter, or an undefined tensor.
  at::Tensor original_base_term(const at::Tensor& input) const;

 protected:

  /// Keeps what the last mixed batch built: the next scope often repeats its rows.
  void mixed_batch_changed() override {}

 private:
  /// What a mixed batch's batched products reuse from one forward to the
  /// next while the weights do not change (defined in linear.cpp).
  struct MixedCache;
  std::shared_ptr<MixedCache> mixed_cache_;

  at::Tensor dora_scale(const LoRALinearAdapterImpl& adapter) const;
  at::Tensor forward_general(const at::Tensor& input);
  at::Tensor forward_mixed(const at::Tensor& input);
  at::Tensor forward_mixed_batched(const at::Tensor& input, at::Tensor& out,
                                   const std::vector<const MixedBatch::Segment*>& segments,
                                   const std::vector<LoRALinearAdapterImpl*>& adapters, int64_t padded_rows,
                                   int64_t max_rank);
  /// One plain adapter in the input's dtype: `addmm_` into the base output.
  at::Tensor forward_fused(const at::Tensor& input, LoRALinearAdapterImpl& adapter);
};

TORCH_MODULE(LoRALinear);

}  // namespace d9d::peft
