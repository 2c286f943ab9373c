#pragma once

#include <d9d/nn/adaptable.h>
#include <d9d/nn/embedding.h>
#include <d9d/nn/linear.h>
#include <d9d/peft/base.h>
#include <d9d/peft/lora/config.h>

#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

namespace d9d::peft {

/// How fresh adapter weights start.
enum class LoRAInit {
  /// A kaiming-uniform(a = sqrt(5)), B zeros (embeddings: A zeros, B normal):
  /// the adapter starts as a no-op.
  Default,
  /// A normal(0, 1/r), B zeros (embeddings as Default). PEFT's "gaussian".
  Gaussian,
  /// Neither is zeroed (PEFT's `init_lora_weights=false`); for tests.
  Random,
};

/// Everything one LoRA layer needs: the d9d parameters plus the Hugging Face
/// PEFT variants.
struct LoRALayerOptions {
  int64_t r = 8;
  double alpha = 16;
  double dropout = 0.0;
  /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
  bool use_rslora = false;
  /// DoRA (linear layers only): a learned magnitude per output row.
  bool use_dora = false;
  LoRAInit init = LoRAInit::Default;

  LoRALayerOptions() = default;
  LoRALayerOptions(int64_t r_, double alpha_, double dropout_ = 0.0) : r(r_), alpha(alpha_), dropout(dropout_) {}
  LoRALayerOptions(const LoRAParameters& p)  // NOLINT: the d9d parameters are the common case
      : r(p.r), alpha(static_cast<double>(p.alpha)), dropout(p.dropout) {}
  double scale() const;
  /// Throws `ConfigError` for r < 1, alpha <= 0 or dropout outside [0, 1).
  void validate() const;
};

/// A LoRA wrapper around a linear layer:
/// `base(x) + scale * lora_B(lora_A(dropout(x)))`, `scale = alpha / r`
/// (`alpha / sqrt(r)` with rsLoRA). With DoRA the result is rescaled per
/// output row: `m / ||W + scale * B A||_row * (W + scale * B A) x + bias`,
/// the norm detached from the graph as PEFT does.
///
/// Children: `base` (keys `base.weight`, `base.bias`), `lora_A` (`[r, in]`),
/// `lora_B` (`[out, r]`), `dropout`; with DoRA the parameter
/// `lora_magnitude_vector` (`[out]`). Adapters are created on the base
/// weight's device and dtype. The base is a `d9d::nn::Linear` (its calls are
/// routed here) or a `torch::nn::Linear` held by a `Sequential`,
/// `ModuleList` or `ModuleDict`.
class LoRALinearImpl : public torch::nn::Module, public d9d::nn::LayerOverride, public AdapterLayer {
 public:
  LoRALinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoRALayerOptions& options);
  LoRALinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoRALayerOptions& options);

  at::Tensor forward(const at::Tensor& input) override;

  /// Re-initialises the adapter as `options().init` says (and DoRA's
  /// magnitude from the current weights).
  void reset_parameters();
  /// DoRA: sets the magnitude to `||W + scale * B A||_row` of the current
  /// weights. Called at construction; call it again after loading base
  /// weights into a model injected before loading.
  void reset_magnitude();

  /// Folds the adapter into the base weight in place (DoRA: `W' = m / ||W + sBA||_row * (W + sBA)`).
  void merge_into_base();
  /// The weight delta merging would add, `scale * B @ A` (not for DoRA).
  at::Tensor delta_weight() const;

  double scale() const noexcept { return scale_; }
  const LoRALayerOptions& options() const noexcept { return options_; }
  std::shared_ptr<torch::nn::Module> base() const;
  const at::Tensor& base_weight() const;
  const at::Tensor& base_bias() const;

  std::vector<std::string> fresh_state_keys() const override;
  void pretty_print(std::ostream& stream) const override;

  torch::nn::Linear lora_A{nullptr};
  torch::nn::Linear lora_B{nullptr};
  torch::nn::Dropout dropout{nullptr};
  /// DoRA only: `[out]`.
  at::Tensor lora_magnitude_vector;

  // Which kind of base this wraps; exactly one is set.
  std::shared_ptr<d9d::nn::LinearImpl> d9d_base;
  std::shared_ptr<torch::nn::LinearImpl> torch_base;

 private:
  void build(int64_t in_features, int64_t out_features);
  at::Tensor dora_scale() const;

  LoRALayerOptions options_;
  double scale_;
};

TORCH_MODULE(LoRALinear);

/// A LoRA wrapper around a `d9d::nn::Embedding`, laid out as PEFT does:
/// `lora_embedding_A` `[r, num_embeddings]`, `lora_embedding_B`
/// `[embedding_dim, r]`; forward `base(ids) + scale * embedding(ids, A^T) @ B^T`;
/// merge `W += scale * (B @ A)^T`.
class LoRAEmbeddingImpl : public torch::nn::Module, public d9d::nn::LayerOverride, public AdapterLayer {
 public:
  LoRAEmbeddingImpl(std::shared_ptr<d9d::nn::EmbeddingImpl> base, const LoRALayerOptions& options);

  at::Tensor forward(const at::Tensor& indices) override;
  void reset_parameters();
  void merge_into_base();
  at::Tensor delta_weight() const;

  double scale() const noexcept { return scale_; }
  const LoRALayerOptions& options() const noexcept { return options_; }

  std::vector<std::string> fresh_state_keys() const override { return {"lora_embedding_A", "lora_embedding_B"}; }
  void pretty_print(std::ostream& stream) const override;

  std::shared_ptr<d9d::nn::EmbeddingImpl> base;
  at::Tensor lora_embedding_A;
  at::Tensor lora_embedding_B;
  torch::nn::Dropout dropout{nullptr};

 private:
  LoRALayerOptions options_;
  double scale_;
};

TORCH_MODULE(LoRAEmbedding);

}  // namespace d9d::peft
