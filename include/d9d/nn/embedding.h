#pragma once

#include <d9d/nn/adaptable.h>

#include <torch/nn/cloneable.h>
#include <torch/nn/options/embedding.h>
#include <torch/nn/pimpl.h>

#include <ostream>

namespace d9d::nn {

/// A drop-in replacement for `torch::nn::Embedding` that PEFT methods can
/// adapt: same options, parameter name (`weight`), initialisation and
/// numerics; calls made through any holder reach a PEFT wrapper that holds it.
///
/// ```
/// d9d::nn::Embedding embed_tokens(torch::nn::EmbeddingOptions(vocab, d));
/// ```
class EmbeddingImpl : public torch::nn::Cloneable<EmbeddingImpl>, public Adaptable {
 public:
  EmbeddingImpl(int64_t num_embeddings, int64_t embedding_dim)
      : EmbeddingImpl(torch::nn::EmbeddingOptions(num_embeddings, embedding_dim)) {}
  /// Throws `d9d::peft::ConfigError` naming the field for a negative size, a
  /// `padding_idx` outside the table or a `_weight` of the wrong shape.
  explicit EmbeddingImpl(torch::nn::EmbeddingOptions options);

  void reset() override;
  /// Normal(0, 1) init, the padding row zeroed, as `torch::nn::Embedding`.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  /// Looks up `indices`, or the PEFT wrapper's forward if one holds this layer.
  at::Tensor forward(const at::Tensor& indices);
  /// The plain lookup, never redirected. Wrappers call this.
  at::Tensor forward_base(const at::Tensor& indices) const;

  torch::nn::EmbeddingOptions options;
  at::Tensor weight;
};

TORCH_MODULE(Embedding);

}  // namespace d9d::nn
