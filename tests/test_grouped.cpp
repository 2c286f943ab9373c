// d9d::nn::GroupedLinear: the experts of a mixture-of-experts block.
#include <d9d/nn/grouped_linear.h>
#include <d9d/peft/errors.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/version.h>

#include "grouped_test_util.h"
#include "toy_moe.h"

#include <sstream>

using ::testing::AllOf;
using ::testing::HasSubstr;
using namespace grouped_test;
namespace peft = d9d::peft;

// ------------------------------------------------------- d9d::nn::GroupedLinear

TEST(GroupedLinear, WeightLayoutAndInitAreD9ds) {
  torch::manual_seed(0);
  d9d::nn::GroupedLinear layer(d9d::nn::GroupedLinearOptions(3, 16, 5));
  const auto keys = layer->named_parameters().keys();
  EXPECT_EQ(keys, std::vector<std::string>{"weight"});
  EXPECT_EQ(layer->weight.sizes(), (std::vector<int64_t>{3, 16, 5}));
  EXPECT_LE(layer->weight.abs().max().item<double>(), 0.25);  // 1/sqrt(16)
  EXPECT_GT(layer->weight.abs().max().item<double>(), 0.2);
  std::ostringstream s;
  s << *layer;
  EXPECT_EQ(s.str(), "d9d::nn::GroupedLinear(groups=3, in_features=16, out_features=5)");
  EXPECT_THAT([] { d9d::nn::GroupedLinear(2, -1, 3); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("GroupedLinearOptions.in_features: must be >= 0")));
  auto copy = std::dynamic_pointer_cast<d9d::nn::GroupedLinearImpl>(layer->clone());
  EXPECT_TRUE(torch::equal(copy->weight, layer->weight));
}

TEST(GroupedLinear, ForwardEqualsAPerExpertLoop) {
  torch::manual_seed(1);
  std::mt19937 rng(1);
  for (const int64_t groups : {1, 3, 8, 64}) {
    d9d::nn::GroupedLinear layer(groups, 12, 7);
    std::vector<std::vector<int64_t>> cases = {random_sizes(rng, groups, 50), random_sizes(rng, groups, 1),
                                               std::vector<int64_t>(static_cast<size_t>(groups), 0)};
    std::vector<int64_t> all_in_last(static_cast<size_t>(groups), 0);
    all_in_last.back() = 33;
    cases.push_back(all_in_last);
    for (const auto& sizes : cases) {
      int64_t tokens = 0;
      for (const int64_t n : sizes) tokens += n;
      const auto x = torch::randn({tokens, 12});
      const auto expected = per_expert(x, layer->weight.detach(), sizes);
      {
        torch::NoGradGuard g;
        const auto y = layer(x, sizes_tensor(sizes));
        ASSERT_EQ(y.sizes(), (std::vector<int64_t>{tokens, 7}));
        EXPECT_LE(max_diff(y, expected), 1e-5) << "groups " << groups;
      }
      const auto y = layer(x, sizes_tensor(sizes));  // the autograd path
      EXPECT_LE(max_diff(y, expected), 1e-5) << "groups " << groups;
    }
  }
}

TEST(GroupedLinear, GradientsEqualThePerExpertLoops) {
  torch::manual_seed(2);
  d9d::nn::GroupedLinear layer(4, 6, 5);
  const std::vector<int64_t> sizes = {3, 0, 5, 2};
  const auto x = torch::randn({10, 6}).requires_grad_(true);
  const auto upstream = torch::randn({10, 5});
  (layer(x, sizes_tensor(sizes)) * upstream).sum().backward();
  const auto x_ref = x.detach().clone().requires_grad_(true);
  const auto w_ref = layer->weight.detach().clone().requires_grad_(true);
  (per_expert(x_ref, w_ref, sizes) * upstream).sum().backward();
  EXPECT_LE(max_diff(x.grad(), x_ref.grad()), 1e-5);
  EXPECT_LE(max_diff(layer->weight.grad(), w_ref.grad()), 1e-5);
  EXPECT_EQ(layer->weight.grad()[1].abs().sum().item<double>(), 0.0) << "an empty expert gets no gradient";
}

TEST(GroupedLinear, GroupedMmPathMatchesTheLoop) {
  // LibTorch 2.9+ runs at::_grouped_mm on CUDA; its CPU kernel checks the call here.
  const bool available = d9d::nn::detail::use_grouped_mm_on_cpu(true);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  ASSERT_TRUE(available) << "LibTorch 2.9+ has at::_grouped_mm";
#else
  // Before 2.9 there is no at::_grouped_mm: the hook must say so, and the
  // per-group path (checked by the other tests) is the only one.
  EXPECT_FALSE(available);
  return;
#endif
  struct Off {
    ~Off() { d9d::nn::detail::use_grouped_mm_on_cpu(false); }
  } off;
  torch::manual_seed(11);
  d9d::nn::GroupedLinear layer(3, 16, 8);
  layer->to(torch::kBFloat16);
  const auto w = layer->weight.detach().to(torch::kFloat);
  for (const std::vector<int64_t>& sizes : {std::vector<int64_t>{8, 0, 16}, std::vector<int64_t>{3, 0, 5}}) {
    int64_t tokens = 0;
    for (const int64_t n : sizes) tokens += n;
    const auto x = torch::randn({tokens, 16}).to(torch::kBFloat16).requires_grad_(true);
    const auto expected = per_expert(x.detach().to(torch::kFloat), w, sizes);
    {
      torch::NoGradGuard g;
      EXPECT_LE(max_diff(layer(x, sizes_tensor(sizes)).to(torch::kFloat), expected), 0.05);
    }
    layer->weight.mutable_grad() = at::Tensor();
    const auto y = layer(x, sizes_tensor(sizes));
    const bool grouped = sizes[0] % 8 == 0;  // the weight's gradient needs 16-byte aligned groups
    EXPECT_EQ(y.grad_fn()->name().find("ContiguousGrad") != std::string::npos, grouped) << y.grad_fn()->name();
    y.sum().backward();  // an expanded gradient, which _grouped_mm's backward alone refuses
    const auto x_ref = x.detach().to(torch::kFloat).requires_grad_(true);
    const auto w_ref = w.clone().requires_grad_(true);
    per_expert(x_ref, w_ref, sizes).sum().backward();
    EXPECT_LE(max_diff(x.grad().to(torch::kFloat), x_ref.grad()), 0.1);
    EXPECT_LE(max_diff(layer->weight.grad().to(torch::kFloat), w_ref.grad()), 0.1);
  }
}

TEST(GroupedLinear, BadInputsNameTheLayerAndTheShapes) {
  d9d::nn::GroupedLinear layer(3, 4, 2);
  const auto x = torch::randn({5, 4});
  auto message = [&](const at::Tensor& in, const at::Tensor& sizes) -> std::string {
    try {
      layer(in, sizes);
    } catch (const peft::PeftError& e) {
      return e.what();
    }
    return "no error";
  };
  const auto layer_name = HasSubstr("d9d::nn::GroupedLinear(groups=3, in_features=4, out_features=2)");
  EXPECT_THAT(message(x, sizes_tensor({2, 3})),
              AllOf(layer_name, HasSubstr("group_sizes has shape [2], expected [3]: one token count per group")));
  EXPECT_THAT(message(x, sizes_tensor({2, 2, 2})),
              AllOf(layer_name, HasSubstr("group_sizes sum to 6 but the input has 5 tokens (input [5, 4])")));
  EXPECT_THAT(message(x, sizes_tensor({4, -1, 2})), HasSubstr("group_sizes[1] is -1; token counts must be >= 0"));
  EXPECT_THAT(message(x, torch::tensor({2, 2, 1}, torch::kInt)),
              HasSubstr("group_sizes must be int64 (torch::kLong), got Int"));
  EXPECT_THAT(message(x, torch::tensor({2.0, 2.0, 1.0})), HasSubstr("group_sizes must be int64"));
  EXPECT_THAT(message(torch::randn({5, 3}), sizes_tensor({2, 2, 1})),
              AllOf(layer_name, HasSubstr("input must be [tokens, in_features=4], got [5, 3]")));
  EXPECT_THAT(message(torch::randn({1, 5, 4}), sizes_tensor({2, 2, 1})),
              HasSubstr("input must be [tokens, in_features=4], got [1, 5, 4]; flatten the tokens to rows"));
  EXPECT_THAT(message(x.to(torch::kDouble), sizes_tensor({2, 2, 1})),
              HasSubstr("input is Double on cpu but the weight is Float on cpu"));
  EXPECT_THAT(message(x, sizes_tensor({2, 2, 1})), "no error");
}

TEST(GroupedLinear, IsADropInForTheExpertsOfAMoEBlock) {
  torch::manual_seed(3);
  toy::MoEConfig c;
  toy::ToyMoE model(c);
  model->eval();
  const auto x = torch::randn({9, c.d});
  const auto y = run(model, x);

  // The same block token by token, each token through its k experts directly.
  torch::NoGradGuard g;
  at::Tensor h = x;
  for (const auto& layer_module : *model->layers) {
    auto& layer = *layer_module->as<toy::MoELayerImpl>();
    const auto& experts = *layer.moe->experts;
    const auto normed = layer.norm(h);
    const auto probs = torch::softmax(normed.matmul(layer.moe->router->weight.t()), -1);
    auto [weights, chosen] = probs.topk(c.top_k, -1);
    weights = weights / weights.sum(-1, true);
    std::vector<at::Tensor> rows;
    for (int64_t t = 0; t < x.size(0); ++t) {
      at::Tensor out = torch::zeros({c.d});
      for (int64_t k = 0; k < c.top_k; ++k) {
        const int64_t e = chosen[t][k].item<int64_t>();
        const auto v = normed[t];
        const auto inner = torch::silu(v.matmul(experts.gate_proj->weight[e])) * v.matmul(experts.up_proj->weight[e]);
        out = out + weights[t][k] * inner.matmul(experts.down_proj->weight[e]);
      }
      rows.push_back(out);
    }
    h = h + torch::stack(rows);
  }
  EXPECT_LE(max_diff(y, h), 1e-5);
}
