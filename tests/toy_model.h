#pragma once
// The toy transformer of tests/fixtures/hf_peft/toy, written the way LibTorch
// users write models: typed members, register_module, TORCH_MODULE.

#include <d9d/nn/linear.h>

#include <torch/nn/functional/activation.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <d9d/nn/embedding.h>
#include <torch/nn/modules/normalization.h>

#include <cmath>
#include <string>

namespace toy {

struct ToyConfig {
  int64_t vocab = 37, d = 16, f = 40, n_layers = 2;
};

inline torch::nn::LayerNorm layer_norm(int64_t d) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({d}).eps(1e-5));
}

inline d9d::nn::Linear linear(int64_t in, int64_t out, bool bias) {
  return d9d::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
}

struct AttentionImpl : torch::nn::Module {
  explicit AttentionImpl(int64_t d)
      : q_proj(register_module("q_proj", linear(d, d, false))),
        k_proj(register_module("k_proj", linear(d, d, false))),
        v_proj(register_module("v_proj", linear(d, d, false))),
        o_proj(register_module("o_proj", linear(d, d, false))) {}

  torch::Tensor forward(const torch::Tensor& h) {
    auto q = q_proj(h), k = k_proj(h), v = v_proj(h);
    const int64_t t = h.size(1);
    auto scores = q.matmul(k.transpose(-2, -1)) / std::sqrt(static_cast<double>(h.size(-1)));
    auto mask = torch::ones({t, t}, torch::kBool).triu(1);
    scores = scores.masked_fill(mask, -std::numeric_limits<float>::infinity());
    return o_proj(torch::softmax(scores, -1).matmul(v));
  }
  d9d::nn::Linear q_proj, k_proj, v_proj, o_proj;
};
TORCH_MODULE(Attention);

struct MlpImpl : torch::nn::Module {
  MlpImpl(int64_t d, int64_t f)
      : up_proj(register_module("up_proj", linear(d, f, true))),
        down_proj(register_module("down_proj", linear(f, d, true))) {}
  torch::Tensor forward(const torch::Tensor& x) { return down_proj(torch::gelu(up_proj(x))); }
  d9d::nn::Linear up_proj, down_proj;
};
TORCH_MODULE(Mlp);

struct LayerImpl : torch::nn::Module {
  LayerImpl(int64_t d, int64_t f)
      : norm(register_module("norm", layer_norm(d))),
        attention(register_module("attention", Attention(d))),
        mlp(register_module("mlp", Mlp(d, f))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = x + attention(norm(x));
    return x + mlp(x);
  }
  torch::nn::LayerNorm norm;
  Attention attention;
  Mlp mlp;
};
TORCH_MODULE(Layer);

struct ToyImpl : torch::nn::Module {
  explicit ToyImpl(const ToyConfig& c = {})
      : embed_tokens(register_module("embed_tokens", d9d::nn::Embedding(c.vocab, c.d))),
        layers(register_module("layers", torch::nn::ModuleList())),
        norm(register_module("norm", layer_norm(c.d))),
        lm_head(register_module("lm_head", linear(c.d, c.vocab, false))) {
    for (int64_t i = 0; i < c.n_layers; ++i) layers->push_back(Layer(c.d, c.f));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    auto x = embed_tokens(ids);
    for (const auto& layer : *layers) x = layer->as<LayerImpl>()->forward(x);
    return lm_head(norm(x));
  }
  d9d::nn::Embedding embed_tokens;
  torch::nn::ModuleList layers;
  torch::nn::LayerNorm norm;
  d9d::nn::Linear lm_head;
};
TORCH_MODULE(Toy);

}  // namespace toy
