#pragma once
// A small GPT written the way LibTorch models are written: typed members,
// register_module, TORCH_MODULE. The layers PEFT may adapt are d9d::nn::Linear
// and d9d::nn::Embedding, drop-ins for the torch layers whose calls follow
// the module tree, so a LoRA wrapper injected later is reached through the
// members below.
//
// Checkpoint keys: embed_tokens.weight, embed_positions.weight,
// layers.<i>.{attn_norm,mlp_norm}.{weight,bias},
// layers.<i>.attention.{q,k,v,o}_proj.{weight,bias},
// layers.<i>.mlp.{up,down}_proj.{weight,bias}, norm.{weight,bias}, lm_head.weight.

#include <d9d/nn/embedding.h>
#include <d9d/nn/linear.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/normalization.h>

namespace trainer {

struct GptConfig {
  int64_t vocab = 0;
  int64_t context = 0;
  int64_t d_model = 64;
  int64_t n_layers = 2;
  int64_t n_heads = 4;
  int64_t d_ff = 128;
};

/// Causal multi-head self-attention.
struct AttentionImpl : torch::nn::Module {
  AttentionImpl(int64_t d_model, int64_t n_heads);
  at::Tensor forward(const at::Tensor& x);

  int64_t n_heads;
  d9d::nn::Linear q_proj, k_proj, v_proj, o_proj;
};
TORCH_MODULE(Attention);

struct MlpImpl : torch::nn::Module {
  MlpImpl(int64_t d_model, int64_t d_ff);
  at::Tensor forward(const at::Tensor& x);

  d9d::nn::Linear up_proj, down_proj;
};
TORCH_MODULE(Mlp);

/// Pre-norm transformer block.
struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(const GptConfig& config);
  at::Tensor forward(at::Tensor x);

  torch::nn::LayerNorm attn_norm;
  Attention attention;
  torch::nn::LayerNorm mlp_norm;
  Mlp mlp;
};
TORCH_MODULE(Block);

struct GptImpl : torch::nn::Module {
  explicit GptImpl(const GptConfig& config);
  /// `ids` `[batch, time]` (int64) -> logits `[batch, time, vocab]`.
  at::Tensor forward(const at::Tensor& ids);

  GptConfig config;
  d9d::nn::Embedding embed_tokens, embed_positions;
  torch::nn::ModuleList layers;
  torch::nn::LayerNorm norm;
  d9d::nn::Linear lm_head;
};
TORCH_MODULE(Gpt);

}  // namespace trainer
