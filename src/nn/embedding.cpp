#include <d9d/nn/embedding.h>
#include <d9d/peft/errors.h>

#include <torch/nn/functional/embedding.h>
#include <torch/nn/init.h>

#include <string>

namespace d9d::nn {

EmbeddingImpl::EmbeddingImpl(torch::nn::EmbeddingOptions options_) : options(std::move(options_)) { reset(); }

void EmbeddingImpl::reset() {
  using d9d::peft::ConfigError;
  const int64_t n = options.num_embeddings(), d = options.embedding_dim();
  if (n < 0) throw ConfigError("EmbeddingOptions.num_embeddings", "must be >= 0, got " + std::to_string(n));
  if (d < 0) throw ConfigError("EmbeddingOptions.embedding_dim", "must be >= 0, got " + std::to_string(d));
  if (options.padding_idx().has_value()) {
    auto& idx = *options.padding_idx();
    if (idx < -n || idx >= n) {
      throw ConfigError("EmbeddingOptions.padding_idx", "must be within [-" + std::to_string(n) + ", " +
                                                            std::to_string(n) + ") for num_embeddings " +
                                                            std::to_string(n) + ", got " + std::to_string(idx));
    }
    if (idx < 0) idx += n;
  }
  if (!options._weight().defined()) {
    weight = register_parameter("weight", torch::empty({n, d}));
    reset_parameters();
  } else {
    const at::Tensor& given = options._weight();
    if (given.dim() != 2 || given.size(0) != n || given.size(1) != d) {
      throw ConfigError("EmbeddingOptions._weight", "has shape " + c10::str(given.sizes()) +
                                                        "; it must be [num_embeddings, embedding_dim] = [" +
                                                        std::to_string(n) + ", " + std::to_string(d) + "]");
    }
    weight = register_parameter("weight", given);
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
