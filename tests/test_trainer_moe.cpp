// The example trainer's mixture-of-experts block (examples/trainer/gpt.h),
// checked against a direct per-token formula, and its module names, which
// the trainer's LoRA patterns and docs rely on.
#include "../examples/trainer/gpt.h"  // not an include path: the other tests keep their flags

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/utils.h>

#include <algorithm>
#include <string>
#include <vector>

namespace {

TEST(TrainerMoe, ForwardEqualsEachTokensWeightedExperts) {
  torch::manual_seed(3);
  const int64_t d = 8, f = 12, experts = 5, k = 2;
  trainer::MoeMlp moe(d, f, experts, k);
  {
    at::NoGradGuard no_grad;  // away from d9d's uniform init, so that experts differ clearly
    for (auto& p : moe->parameters()) p.normal_(0.0, 0.5);
  }
  const at::Tensor x = at::randn({3, 7, d});
  const at::Tensor y = moe(x);
  ASSERT_EQ(y.sizes(), x.sizes());

  // Each token alone: softmax over the router's scores, its k best experts,
  // their probabilities renormalised, the SwiGLU experts from their weights.
  const at::Tensor tokens = x.reshape({-1, d});
  const at::Tensor w_router = moe->router->weight;  // [experts, d]
  const at::Tensor w_gate = moe->experts->gate_proj->weight, w_up = moe->experts->up_proj->weight,
                   w_down = moe->experts->down_proj->weight;  // [experts, in, out]
  std::vector<int64_t> load(experts, 0);
  for (int64_t t = 0; t < tokens.size(0); ++t) {
    const at::Tensor v = tokens[t];
    const at::Tensor probs = at::softmax(at::mv(w_router, v), 0);
    std::vector<int64_t> order(experts);
    for (int64_t e = 0; e < experts; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return probs[a].item<double>() > probs[b].item<double>(); });
    double total = 0;
    for (int64_t j = 0; j < k; ++j) total += probs[order[j]].item<double>();
    at::Tensor expected = at::zeros({d});
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = order[j];
      ++load[e];
      const at::Tensor hidden = at::silu(at::matmul(v, w_gate[e])) * at::matmul(v, w_up[e]);
      expected = expected + (probs[e].item<double>() / total) * at::matmul(hidden, w_down[e]);
    }
    EXPECT_TRUE(at::allclose(y.reshape({-1, d})[t], expected, 1e-4, 1e-5)) << "token " << t;
  }
  // The load balance the trainer reports: the tokens each expert received.
  const at::Tensor routed = moe->routed;
  for (int64_t e = 0; e < experts; ++e) EXPECT_EQ(routed[e].item<int64_t>(), load[e]) << "expert " << e;

  // Gradients reach the router (through the weights) and every used expert.
  y.pow(2).sum().backward();
  EXPECT_GT(moe->router->weight.grad().abs().sum().item<double>(), 0);
  EXPECT_GT(moe->experts->down_proj->weight.grad().abs().sum().item<double>(), 0);
}

TEST(TrainerMoe, ModuleNamesAndDenseDefault) {
  trainer::GptConfig c;
  c.vocab = 10;
  c.context = 8;
  c.d_model = 8;
  c.n_layers = 1;
  c.n_heads = 2;
  c.d_ff = 16;
  auto keys = [](const trainer::Gpt& model) {
    std::vector<std::string> mlp;
    for (const auto& item : model->named_parameters()) {
      if (item.key().find(".mlp.") != std::string::npos) mlp.push_back(item.key());
    }
    return mlp;
  };
  EXPECT_EQ(keys(trainer::Gpt(c)), (std::vector<std::string>{"layers.0.mlp.up_proj.weight", "layers.0.mlp.up_proj.bias",
                                                               "layers.0.mlp.down_proj.weight",
                                                               "layers.0.mlp.down_proj.bias"}));
  c.experts = 4;
  c.top_k = 2;
  const trainer::Gpt moe(c);
  EXPECT_EQ(keys(moe), (std::vector<std::string>{"layers.0.mlp.router.weight", "layers.0.mlp.experts.gate_proj.weight",
                                                  "layers.0.mlp.experts.up_proj.weight",
                                                  "layers.0.mlp.experts.down_proj.weight"}));
  // The GPT-2 initialisation reaches the experts too: N(0, 0.02), not d9d's uniform.
  const at::Tensor gate = moe->named_parameters()["layers.0.mlp.experts.gate_proj.weight"];
  EXPECT_EQ(gate.sizes(), (std::vector<int64_t>{4, 8, 16}));
  EXPECT_LT(gate.std().item<double>(), 0.03);
}

}  // namespace
