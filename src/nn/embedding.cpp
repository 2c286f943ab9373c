#include <d9d/nn/embedding.h>

#include <torch/nn/functional/embedding.h>
#include <torch/nn/init.h>

namespace d9d::nn {

EmbeddingImpl::EmbeddingImpl(torch::nn::EmbeddingOptions options_) : options(std::move(options_)) { reset(); }

void EmbeddingImpl::reset() {
  if (options.padding_idx().has_value()) {
    auto& idx = *options.padding_idx();
    if (idx < 0) idx += options.num_embeddings();
    TORCH_CHECK(idx >= 0 && idx < options.num_embeddings(), "d9d::nn::Embedding: padding_idx must be within "
                                                             "num_embeddings");
  }
  if (!options._weight().defined()) {
    weight = register_parameter("weight", torch::empty({options.num_embeddings(), options.embedding_dim()}));
    reset_parameters();
  } else {
    TORCH_CHECK(options._weight().size(0) == options.num_embeddings() &&
                    options._weight().size(1) == options.embedding_dim(),
                "d9d::nn::Embedding: _weight shape does not match num_embeddings x embedding_dim");
    weight = register_parameter("weight", options._weight());
  }
}

void EmbeddingImpl::reset_parameters() {
  torch::nn::init::normal_(weight);
  if (options.padding_idx().has_value()) {
    torch::NoGradGuard no_grad;
    weight[*options.padding_idx()].fill_(0);
  }
}

void EmbeddingImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::nn::Embedding(num_embeddings=" << options.num_embeddings()
         << ", embedding_dim=" << options.embedding_dim();
  if (options.padding_idx().has_value()) stream << ", padding_idx=" << *options.padding_idx();
  stream << ")";
}

at::Tensor EmbeddingImpl::forward(const at::Tensor& indices) {
  if (auto target = override_target()) return target->forward(indices);
  return forward_base(indices);
}

at::Tensor EmbeddingImpl::forward_base(const at::Tensor& indices) const {
  return torch::nn::functional::embedding(indices, weight,
                                          torch::nn::functional::EmbeddingFuncOptions()
                                              .padding_idx(options.padding_idx())
                                              .max_norm(options.max_norm())
                                              .norm_type(options.norm_type())
                                              .scale_grad_by_freq(options.scale_grad_by_freq())
                                              .sparse(options.sparse()));
}

}  // namespace d9d::nn
