#pragma once
// A small mixture-of-experts model written the way LibTorch users write
// models (typed members, register_module, TORCH_MODULE): a router, top-k
// routing, tokens sorted by expert, SwiGLU experts as d9d::nn::GroupedLinear,
// results scattered back. Keys: layers.<i>.norm.{weight,bias},
// layers.<i>.moe.router.weight, layers.<i>.moe.experts.{gate,up,down}_proj.weight.

#include <d9d/nn/grouped_linear.h>
#include <d9d/nn/linear.h>

#include <ATen/Functions.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/normalization.h>

#include <tuple>

namespace toy {

struct MoEConfig {
  int64_t d = 16, f = 24, experts = 4, top_k = 2, n_layers = 2;
};

/// The experts: `down(silu(gate(x)) * up(x))` on tokens sorted by expert.
struct ExpertsImpl : torch::nn::Module {
  ExpertsImpl(int64_t experts, int64_t d, int64_t f)
      : gate_proj(register_module("gate_proj", d9d::nn::GroupedLinear(experts, d, f))),
        up_proj(register_module("up_proj", d9d::nn::GroupedLinear(experts, d, f))),
        down_proj(register_module("down_proj", d9d::nn::GroupedLinear(experts, f, d))) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& counts) {
    return down_proj(torch::silu(gate_proj(x, counts)) * up_proj(x, counts), counts);
  }
  d9d::nn::GroupedLinear gate_proj, up_proj, down_proj;
};
TORCH_MODULE(Experts);

/// Top-k routing over `[tokens, d]`.
struct MoEImpl : torch::nn::Module {
  explicit MoEImpl(const MoEConfig& c)
      : top_k(c.top_k),
        experts_count(c.experts),
        router(register_module("router", d9d::nn::Linear(torch::nn::LinearOptions(c.d, c.experts).bias(false)))),
        experts(register_module("experts", Experts(c.experts, c.d, c.f))) {}

  torch::Tensor forward(const torch::Tensor& x) {
    const auto probs = torch::softmax(router(x), -1);
    auto [weights, chosen] = probs.topk(top_k, -1);     // [T, k]
    weights = weights / weights.sum(-1, /*keepdim=*/true);
    const auto flat = chosen.reshape({-1});             // [T * k]: expert of each (token, slot)
    const auto order = std::get<1>(flat.sort(c10::optional<bool>(true), /*dim=*/0));  // stable
    const auto token = order.div(top_k, "floor");       // the token of each sorted slot
    const auto counts = at::bincount(flat, {}, experts_count);
    const auto slot_weights = weights.reshape({-1}).index_select(0, order).unsqueeze(1);
    const auto y = experts(x.index_select(0, token), counts) * slot_weights;
    return torch::zeros_like(x).index_add(0, token, y);
  }

  int64_t top_k, experts_count;
  d9d::nn::Linear router;
  Experts experts;
};
TORCH_MODULE(MoE);

struct MoELayerImpl : torch::nn::Module {
  explicit MoELayerImpl(const MoEConfig& c)
      : norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.d})))),
        moe(register_module("moe", MoE(c))) {}
  torch::Tensor forward(const torch::Tensor& x) { return x + moe(norm(x)); }
  torch::nn::LayerNorm norm;
  MoE moe;
};
TORCH_MODULE(MoELayer);

/// `[tokens, d] -> [tokens, d]`.
struct ToyMoEImpl : torch::nn::Module {
  explicit ToyMoEImpl(const MoEConfig& c = {}) : layers(register_module("layers", torch::nn::ModuleList())) {
    for (int64_t i = 0; i < c.n_layers; ++i) layers->push_back(MoELayer(c));
  }
  torch::Tensor forward(torch::Tensor x) {
    for (const auto& layer : *layers) x = layer->as<MoELayerImpl>()->forward(x);
    return x;
  }
  torch::nn::ModuleList layers;
};
TORCH_MODULE(ToyMoE);

}  // namespace toy
