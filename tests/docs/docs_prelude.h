#pragma once
// What every code sample of the documentation may use without declaring it.
// A fragment (a block that is not a whole program) is compiled as the body of
// a function in which these names exist:
//
//   model       docs::Model, a small transformer written the LibTorch way
//               (embed_tokens, layers.<i>.attention.{q,k,v,o}_proj,
//               layers.<i>.mlp.{up,down}_proj, norm, lm_head)
//   checkpoint  d9d::model_state::StateDict, a standard checkpoint of it
//   mapper      d9d::model_state::MapperPtr
//   lora        d9d::peft::LoRA
//   ids         at::Tensor, token ids [batch, time]
//   text        std::string, JSON text
//   path        std::string, a file or directory

#include "docs_registry.h"

#include <d9d/peft.h>

#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/normalization.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <memory>
#include <string>
#include <vector>

namespace docs {

struct AttentionImpl : torch::nn::Module {
  explicit AttentionImpl(int64_t d)
      : q_proj(register_module("q_proj", d9d::nn::Linear(d, d))),
        k_proj(register_module("k_proj", d9d::nn::Linear(d, d))),
        v_proj(register_module("v_proj", d9d::nn::Linear(d, d))),
        o_proj(register_module("o_proj", d9d::nn::Linear(d, d))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    auto scores = torch::matmul(q_proj(x), k_proj(x).transpose(-2, -1));
    return o_proj(torch::matmul(torch::softmax(scores, -1), v_proj(x)));
  }
  d9d::nn::Linear q_proj, k_proj, v_proj, o_proj;
};
TORCH_MODULE(Attention);

struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(int64_t d)
      : up_proj(register_module("up_proj", d9d::nn::Linear(d, 4 * d))),
        down_proj(register_module("down_proj", d9d::nn::Linear(4 * d, d))) {}
  torch::Tensor forward(const torch::Tensor& x) { return down_proj(torch::gelu(up_proj(x))); }
  d9d::nn::Linear up_proj, down_proj;
};
TORCH_MODULE(Mlp);

struct LayerImpl : torch::nn::Module {
  explicit LayerImpl(int64_t d)
      : attention(register_module("attention", Attention(d))), mlp(register_module("mlp", Mlp(d))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = x + attention(x);
    return x + mlp(x);
  }
  Attention attention;
  Mlp mlp;
};
TORCH_MODULE(Layer);

struct ModelImpl : torch::nn::Module {
  ModelImpl(int64_t vocab = 32, int64_t d = 16, int64_t n_layers = 2)
      : embed_tokens(register_module("embed_tokens", d9d::nn::Embedding(vocab, d))),
        layers(register_module("layers", torch::nn::ModuleList())),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})))),
        lm_head(register_module("lm_head", d9d::nn::Linear(torch::nn::LinearOptions(d, vocab).bias(false)))) {
    for (int64_t i = 0; i < n_layers; ++i) layers->push_back(Layer(d));
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
TORCH_MODULE(Model);

/// The names a fragment finds in scope.
struct Context {
  Model model;
  d9d::model_state::StateDict checkpoint = d9d::model_state::module_state_dict(*Model());
  d9d::model_state::MapperPtr mapper;
  d9d::peft::LoRA lora{d9d::peft::LoRAConfig{".*_proj", d9d::peft::LoRAParameters().r(8).alpha(16)}};
  at::Tensor ids;
  std::string text = R"({"kind":"lora","module_name_pattern":".*_proj","params":{"r":8,"alpha":16,"dropout":0.0}})";
  std::string path = "checkpoints/base";
};

}  // namespace docs

#define DOCS_CONTEXT_NAMES(context)    \
  auto& model = (context).model;           \
  auto& checkpoint = (context).checkpoint; \
  auto& mapper = (context).mapper;         \
  auto& lora = (context).lora;             \
  auto& ids = (context).ids;               \
  auto& text = (context).text;             \
  auto& path = (context).path;             \
  (void)model, (void)checkpoint, (void)mapper, (void)lora, (void)ids, (void)text, (void)path
