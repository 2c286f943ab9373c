#pragma once

#include <d9d/nn/embedding.h>
#include <d9d/peft/lora/lora_layer.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// One named LoRA adapter of an embedding, laid out as PEFT does:
/// `lora_embedding_A` `[r, num_embeddings]`, `lora_embedding_B` `[dim, r]`,
/// with DoRA `lora_magnitude_vector` `[dim]`.
class LoRAEmbeddingAdapterImpl : public torch::nn::Module {
 public:
  LoRAEmbeddingAdapterImpl(int64_t num_embeddings, int64_t dim, const LoRAParameters& options,
                           const at::TensorOptions& like);

  const LoRAParameters& options() const noexcept { return options_; }
  double scale() const noexcept { return scale_; }
  void pretty_print(std::ostream& stream) const override;
  /// As `LoRALinearAdapterImpl::pad_rank`, for `lora_embedding_A`/`lora_embedding_B`.
  void pad_rank(int64_t r);

  at::Tensor lora_embedding_A;
  at::Tensor lora_embedding_B;
  /// DoRA only: the magnitude of each embedding dimension, `[embedding_dim]`.
  at::Tensor lora_magnitude_vector;
  /// DoRA while merged: the column norms the merge divided by.
  at::Tensor merged_norm;

 private:
  LoRAParameters options_;
  double scale_;
};

/// A LoRA wrapper around a `d9d::nn::Embedding`, laid out as PEFT does:
/// forward `base(ids) + sum over active adapters of scale * embedding(ids, A^T) @ B^T`;
/// merge `W += scale * (B @ A)^T`. Keys as `LoRALinearImpl`: the first
/// adapter's `lora_embedding_A`/`lora_embedding_B` on the wrapper, further
/// ones under `adapters.<name>.`.
class LoRAEmbeddingImpl : public LoRALayer<LoRAEmbeddingAdapterImpl> {
 public:
  LoRAEmbeddingImpl(std::shared_ptr<d9d::nn::EmbeddingImpl> base, const LoRAParameters& options,
                    const std::string& adapter_name = kDefaultAdapterName);

  at::Tensor forward(const at::Tensor& indices) override;

  void add_adapter(const std::string& name, const AdapterOptions& options) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  at::Tensor delta_weight(const std::string& name) const override;
  torch::nn::AnyModule unwrap() override;
  bool supports_mixed_batch() const override { return true; }
  void pretty_print(std::ostream& stream) const override;

  std::shared_ptr<d9d::nn::EmbeddingImpl> base;
  /// The first adapter's weights.
  at::Tensor lora_embedding_A;
  at::Tensor lora_embedding_B;
  /// The first adapter's DoRA magnitude (undefined without DoRA).
  at::Tensor lora_magnitude_vector;

 protected:
  void relayout() override;
  void reset_adapter(LoRAEmbeddingAdapterImpl& adapter) override;
  void reset_adapter_magnitude(LoRAEmbeddingAdapterImpl& adapter) override;

 private:
  at::Tensor forward_mixed(const at::Tensor& indices, at::Tensor out);
};

TORCH_MODULE(LoRAEmbedding);

}  // namespace d9d::peft
