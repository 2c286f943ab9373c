#pragma once
// The C++ twin of moe_twin.py: the same small mixture-of-experts language
// model, the same keys (but for the experts, which are grouped layers here),
// the same forward. The experts of a layer are two d9d::nn::GroupedLinear,
// registered in the Python module's order: `gate_up_proj` [E, d, 2*ff] (gate
// columns, then up) and `down_proj` [E, ff, d], so that their qualified names
// are PEFT's parameter names (`model.layers.0.mlp.experts.gate_up_proj`).
// `load_twin` reads the Python twin's state dict in either layout.

#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/compose/parallel.h>
#include <d9d/model_state/mapper/compose/sequential.h>
#include <d9d/model_state/mapper/leaf/identity.h>
#include <d9d/model_state/mapper/leaf/rename.h>
#include <d9d/model_state/mapper/leaf/transpose.h>
#include <d9d/nn/grouped_linear.h>
#include <d9d/nn/linear.h>

#include <torch/nn/functional/activation.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>

#include <nlohmann/json.hpp>

#include <memory>
#include <set>
#include <string>
#include <vector>

namespace moe_twin {

struct Config {
  int64_t vocab = 37, d = 16, ff = 12, layers = 2, experts = 4, top_k = 2;
  std::string layout = "fused";  // "fused": [E, out, in] in the file; "fused_in_out": [E, in, out]

  static Config from_json(const nlohmann::json& j) {
    Config c;
    c.vocab = j.at("vocab");
    c.d = j.at("d");
    c.ff = j.at("ff");
    c.layers = j.at("layers");
    c.experts = j.at("experts");
    c.top_k = j.at("top_k");
    c.layout = j.at("layout").get<std::string>();
    return c;
  }
};

inline torch::nn::LayerNorm layer_norm(int64_t d) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({d}).eps(1e-5));
}

struct ExpertsImpl : torch::nn::Module {
  ExpertsImpl(int64_t experts, int64_t d, int64_t ff)
      : gate_up_proj(register_module("gate_up_proj", d9d::nn::GroupedLinear(experts, d, 2 * ff))),
        down_proj(register_module("down_proj", d9d::nn::GroupedLinear(experts, ff, d))) {}

  /// x [N, d]; index, weights [N, k]: each token's experts and routing weights.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& index, const torch::Tensor& weights) {
    const int64_t k = index.size(1), experts = gate_up_proj->options.groups();
    const auto flat = index.reshape({-1});
    const auto order = std::get<1>(flat.sort(c10::optional<bool>(true), /*dim=*/0));  // (token, slot) pairs by expert
    const auto token = order.div(k, "floor");
    const auto counts = torch::bincount(flat, {}, experts);
    const auto chunks = gate_up_proj(x.index_select(0, token), counts).chunk(2, -1);
    const auto y = down_proj(torch::silu(chunks[0]) * chunks[1], counts) *
                   weights.reshape({-1}).index_select(0, order).unsqueeze(1);
    return torch::zeros_like(x).index_add(0, token, y);
  }
  d9d::nn::GroupedLinear gate_up_proj, down_proj;
};
TORCH_MODULE(Experts);

struct SparseBlockImpl : torch::nn::Module {
  explicit SparseBlockImpl(const Config& c)
      : top_k(c.top_k),
        router(register_module("router", d9d::nn::Linear(torch::nn::LinearOptions(c.d, c.experts).bias(false)))),
        experts(register_module("experts", Experts(c.experts, c.d, c.ff))) {}

  torch::Tensor forward(const torch::Tensor& x) {
    const auto probs = torch::softmax(router(x), -1, torch::kFloat);
    auto [weights, index] = torch::topk(probs, top_k, -1);
    weights = (weights / weights.sum(-1, /*keepdim=*/true)).to(x.scalar_type());
    return experts(x, index, weights);
  }
  int64_t top_k;
  d9d::nn::Linear router;
  Experts experts;
};
TORCH_MODULE(SparseBlock);

struct LayerImpl : torch::nn::Module {
  explicit LayerImpl(const Config& c)
      : mix_norm(register_module("mix_norm", layer_norm(c.d))),
        mix(register_module("mix", d9d::nn::Linear(torch::nn::LinearOptions(c.d, c.d)))),
        moe_norm(register_module("moe_norm", layer_norm(c.d))),
        mlp(register_module("mlp", SparseBlock(c))) {}

  torch::Tensor forward(torch::Tensor h) {
    const auto a = mix_norm(h);
    const auto steps = torch::arange(1, h.size(1) + 1, h.options()).view({1, -1, 1});
    h = h + mix(a.cumsum(1) / steps);
    const int64_t b = h.size(0), t = h.size(1), d = h.size(2);
    return h + mlp(moe_norm(h).reshape({b * t, d})).reshape({b, t, d});
  }
  torch::nn::LayerNorm mix_norm;
  d9d::nn::Linear mix;
  torch::nn::LayerNorm moe_norm;
  SparseBlock mlp;
};
TORCH_MODULE(Layer);

struct ModelImpl : torch::nn::Module {
  explicit ModelImpl(const Config& c)
      : embed_tokens(register_module("embed_tokens", torch::nn::Embedding(c.vocab, c.d))),
        layers(register_module("layers", torch::nn::ModuleList())),
        norm(register_module("norm", layer_norm(c.d))) {
    for (int64_t i = 0; i < c.layers; ++i) layers->push_back(Layer(c));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    auto h = embed_tokens(ids);
    for (const auto& layer : *layers) h = layer->as<LayerImpl>()->forward(h);
    return norm(h);
  }
  torch::nn::Embedding embed_tokens;
  torch::nn::ModuleList layers;
  torch::nn::LayerNorm norm;
};
TORCH_MODULE(Model);

struct TwinImpl : torch::nn::Module {
  explicit TwinImpl(const Config& c)
      : config(c),
        model(register_module("model", Model(c))),
        lm_head(register_module("lm_head", d9d::nn::Linear(torch::nn::LinearOptions(c.d, c.vocab).bias(false)))) {}
  torch::Tensor forward(const torch::Tensor& ids) { return lm_head(model(ids)); }
  Config config;
  Model model;
  d9d::nn::Linear lm_head;
};
TORCH_MODULE(Twin);

/// The experts' keys of the Python twin (`model.layers.<i>.mlp.experts.gate_up_proj`, no `.weight`).
inline std::vector<std::string> expert_keys(const Config& c) {
  std::vector<std::string> keys;
  for (int64_t i = 0; i < c.layers; ++i) {
    for (const char* p : {"gate_up_proj", "down_proj"}) {
      keys.push_back("model.layers." + std::to_string(i) + ".mlp.experts." + p);
    }
  }
  return keys;
}

/// Python twin keys -> this twin: every key as it is, but the experts' 3-D
/// parameters renamed to the grouped layers' `.weight` and, in the `fused`
/// layout ([E, out, in], an nn.Linear weight per expert), transposed to [E, in, out].
inline d9d::model_state::MapperPtr load_mapper(const torch::nn::Module& twin, const Config& c) {
  namespace ms = d9d::model_state;
  std::vector<ms::MapperPtr> parts;
  std::set<std::string> experts;
  for (const auto& key : expert_keys(c)) {
    experts.insert(key + ".weight");
    std::vector<ms::MapperPtr> steps;
    steps.push_back(std::make_shared<ms::Rename>(key, key + ".weight"));
    if (c.layout == "fused") steps.push_back(std::make_shared<ms::Transpose>(key + ".weight", 1, 2));
    parts.push_back(std::make_shared<ms::Sequential>(steps));
  }
  for (const auto& item : twin.named_parameters()) {
    if (!experts.count(item.key())) parts.push_back(std::make_shared<ms::Identity>(item.key()));
  }
  for (const auto& item : twin.named_buffers()) parts.push_back(std::make_shared<ms::Identity>(item.key()));
  return std::make_shared<ms::Parallel>(parts);
}

/// An expert weight of this twin ([E, in, out]) in the Python twin's layout.
inline torch::Tensor to_python_layout(const torch::Tensor& weight, const Config& c) {
  return c.layout == "fused" ? weight.transpose(1, 2) : weight;
}

}  // namespace moe_twin
