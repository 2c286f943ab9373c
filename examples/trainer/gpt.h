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
// With experts (GptConfig::experts > 0) each block's MLP is a routed mixture
// of experts instead: layers.<i>.mlp.router.weight,
// layers.<i>.mlp.experts.{gate,up,down}_proj.weight (d9d::nn::GroupedLinear).

#include <d9d/nn/embedding.h>
#include <d9d/nn/grouped_linear.h>
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
  /// 0: a dense MLP per block. Otherwise a mixture of `experts` SwiGLU
  /// experts of width `d_ff`, each token routed to `top_k` of them.
  int64_t experts = 0;
  int64_t top_k = 0;
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

/// The experts of a MoE block, SwiGLU: `down(silu(gate(x)) * up(x))`, on
/// tokens sorted by expert, `counts[e]` of them for expert `e`.
struct ExpertsImpl : torch::nn::Module {
  ExpertsImpl(int64_t experts, int64_t d_model, int64_t d_ff);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& counts);

  d9d::nn::GroupedLinear gate_proj, up_proj, down_proj;
};
TORCH_MODULE(Experts);

/// A routed mixture of experts in place of the MLP: a router without bias,
/// softmax, the top-k experts of each token with their probabilities
/// renormalised to sum to 1, the tokens' copies stably sorted by expert, one
/// grouped call per expert layer, and the weighted results added back per token.
struct MoeMlpImpl : torch::nn::Module {
  MoeMlpImpl(int64_t d_model, int64_t d_ff, int64_t experts, int64_t top_k);
  /// `[..., d_model]` -> the same shape.
  at::Tensor forward(const at::Tensor& x);

  int64_t n_experts, top_k;
  d9d::nn::Linear router;
  Experts experts;
  /// Tokens routed to each expert (`[experts]`, int64, on the CPU), summed
  /// over the forward calls since it was last zeroed: the load balance.
  at::Tensor routed;
};
TORCH_MODULE(MoeMlp);

/// Pre-norm transformer block.
struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(const GptConfig& config);
  at::Tensor forward(at::Tensor x);

  torch::nn::LayerNorm attn_norm;
  Attention attention;
  torch::nn::LayerNorm mlp_norm;
  Mlp mlp{nullptr};     // dense (config.experts == 0) ...
  MoeMlp moe{nullptr};  // ... or routed experts; either is registered as "mlp"
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
