#include "gpt.h"

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>
#include <limits>

namespace trainer {

namespace {

torch::nn::LayerNorm layer_norm(int64_t d) { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})); }

/// GPT-2's initialisation: small normal weights keep a fresh deep stack stable.
void init_gpt_weights(torch::nn::Module& model) {
  at::NoGradGuard no_grad;
  for (auto& item : model.named_parameters()) {
    const std::string& key = item.key();
    at::Tensor& p = item.value();
    if (key.size() >= 5 && key.compare(key.size() - 5, 5, ".bias") == 0) {
      if (key.find("norm") == std::string::npos) p.zero_();
    } else if (p.dim() >= 2) {  // Linear, Embedding, and each expert of a GroupedLinear
      p.normal_(0.0, 0.02);
    }
  }
}

}  // namespace

AttentionImpl::AttentionImpl(int64_t d_model, int64_t heads)
    : n_heads(heads),
      q_proj(register_module("q_proj", d9d::nn::Linear(d_model, d_model))),
      k_proj(register_module("k_proj", d9d::nn::Linear(d_model, d_model))),
      v_proj(register_module("v_proj", d9d::nn::Linear(d_model, d_model))),
      o_proj(register_module("o_proj", d9d::nn::Linear(d_model, d_model))) {}

at::Tensor AttentionImpl::forward(const at::Tensor& x) {
  const int64_t b = x.size(0), t = x.size(1), d = x.size(2), dh = d / n_heads;
  auto heads = [&](const at::Tensor& y) { return y.view({b, t, n_heads, dh}).transpose(1, 2); };  // [b, h, t, dh]
  const at::Tensor q = heads(q_proj(x)), k = heads(k_proj(x)), v = heads(v_proj(x));
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(dh));
  const at::Tensor future = at::ones({t, t}, x.options().dtype(at::kBool)).triu(1);
  scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
  const at::Tensor mixed = at::matmul(at::softmax(scores, -1), v);  // [b, h, t, dh]
  return o_proj(mixed.transpose(1, 2).reshape({b, t, d}));
}

MlpImpl::MlpImpl(int64_t d_model, int64_t d_ff)
    : up_proj(register_module("up_proj", d9d::nn::Linear(d_model, d_ff))),
      down_proj(register_module("down_proj", d9d::nn::Linear(d_ff, d_model))) {}

at::Tensor MlpImpl::forward(const at::Tensor& x) { return down_proj(at::gelu(up_proj(x))); }

ExpertsImpl::ExpertsImpl(int64_t experts, int64_t d_model, int64_t d_ff)
    : gate_proj(register_module("gate_proj", d9d::nn::GroupedLinear(experts, d_model, d_ff))),
      up_proj(register_module("up_proj", d9d::nn::GroupedLinear(experts, d_model, d_ff))),
      down_proj(register_module("down_proj", d9d::nn::GroupedLinear(experts, d_ff, d_model))) {}

at::Tensor ExpertsImpl::forward(const at::Tensor& x, const at::Tensor& counts) {
  return down_proj(at::silu(gate_proj(x, counts)) * up_proj(x, counts), counts);
}

MoeMlpImpl::MoeMlpImpl(int64_t d_model, int64_t d_ff, int64_t experts_, int64_t k)
    : n_experts(experts_),
      top_k(k),
      router(register_module("router",
                             d9d::nn::Linear(torch::nn::LinearOptions(d_model, experts_).bias(false)))),
      experts(register_module("experts", Experts(experts_, d_model, d_ff))),
      routed(at::zeros({experts_}, at::kLong)) {}

at::Tensor MoeMlpImpl::forward(const at::Tensor& input) {
  const at::Tensor x = input.reshape({-1, input.size(-1)});  // [T, d]
  const auto top = at::softmax(router(x), -1).topk(top_k, -1);
  const at::Tensor weights = std::get<0>(top) / std::get<0>(top).sum(-1, /*keepdim=*/true);  // [T, k]
  const at::Tensor flat = std::get<1>(top).reshape({-1});  // [T * k]: the expert of each (token, slot)
  const at::Tensor order = std::get<1>(flat.sort(c10::optional<bool>(true), /*dim=*/0)  /* stable */);
  const at::Tensor token = order.div(top_k, "floor");  // the token of each sorted slot
  const at::Tensor counts = at::bincount(flat, {}, n_experts).cpu();  // read on the host by the grouped layers
  {
    at::NoGradGuard no_grad;
    routed += counts;
  }
  const at::Tensor slot_weights = weights.reshape({-1}).index_select(0, order).unsqueeze(1);
  const at::Tensor y = experts(x.index_select(0, token), counts) * slot_weights;
  return at::zeros_like(x).index_add(0, token, y).view(input.sizes());
}

BlockImpl::BlockImpl(const GptConfig& c)
    : attn_norm(register_module("attn_norm", layer_norm(c.d_model))),
      attention(register_module("attention", Attention(c.d_model, c.n_heads))),
      mlp_norm(register_module("mlp_norm", layer_norm(c.d_model))) {
  if (c.experts > 0) {
    moe = register_module("mlp", MoeMlp(c.d_model, c.d_ff, c.experts, c.top_k));
  } else {
    mlp = register_module("mlp", Mlp(c.d_model, c.d_ff));
  }
}

at::Tensor BlockImpl::forward(at::Tensor x) {
  x = x + attention(attn_norm(x));
  const at::Tensor h = mlp_norm(x);
  return x + (moe ? moe(h) : mlp(h));
}

GptImpl::GptImpl(const GptConfig& c)
    : config(c),
      embed_tokens(register_module("embed_tokens", d9d::nn::Embedding(c.vocab, c.d_model))),
      embed_positions(register_module("embed_positions", d9d::nn::Embedding(c.context, c.d_model))),
      layers(register_module("layers", torch::nn::ModuleList())),
      norm(register_module("norm", layer_norm(c.d_model))),
      lm_head(register_module("lm_head", d9d::nn::Linear(torch::nn::LinearOptions(c.d_model, c.vocab).bias(false)))) {
  for (int64_t i = 0; i < c.n_layers; ++i) layers->push_back(Block(c));
  init_gpt_weights(*this);
}

at::Tensor GptImpl::forward(const at::Tensor& ids) {
  const at::Tensor positions = at::arange(ids.size(1), ids.options());
  at::Tensor x = embed_tokens(ids) + embed_positions(positions);
  for (const auto& layer : *layers) x = layer->as<BlockImpl>()->forward(x);
  return lm_head(norm(x));
}

}  // namespace trainer
