// OFT's math and layer: the rotation against the Cayley formulas written
// out, COFT's projection, PEFT's adjustment of r/oft_block_size, and the
// layer's forward, merge and adapters against x R Wᵀ + b. PEFT's fixture,
// training, files and configs are in test_oft_files.cpp; random PEFT configs
// both ways in tests/peft_reference (OFT cases).
#include "oft_by_hand.h"
#include "test_util.h"

#include <d9d/peft.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

namespace peft = d9d::peft;
using ::testing::HasSubstr;
using namespace d9d_test;

namespace {

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

TEST(OFTMath, CayleyExactIsOrthogonalAndNeumannIsWithinItsBound) {
  torch::manual_seed(0);
  const int64_t b = 5;
  const auto vec = 0.05 * torch::randn({3, b * (b - 1) / 2}, at::kDouble);
  const auto exact = peft::oft::cayley(vec, b, /*neumann=*/false, 5);
  const auto series = peft::oft::cayley(vec, b, /*neumann=*/true, 5);
  const auto eye = torch::eye(b, at::kDouble);
  for (int64_t i = 0; i < 3; ++i) {
    const auto q = skew_by_hand(vec[i], b);
    EXPECT_LE(max_diff(q, -q.t()), 0.0);
    // PEFT's exact branch solves X (I + Q) = I - Q.
    EXPECT_LE(max_diff(exact[i], (eye - q).mm(torch::inverse(eye + q))), 1e-12);
    EXPECT_LE(max_diff(exact[i].mm(exact[i].t()), eye), 1e-12) << "the exact Cayley transform is orthogonal";
    EXPECT_LE(max_diff(series[i], neumann_by_hand(q, 5)), 1e-12);
    // Its Neumann branch truncates (I + Q)(I - Q)⁻¹ = I + 2 Σ Q^p: the tail is
    // Q⁴ + 2 Σ_{p≥5} Q^p, at most n⁴ + 2 n⁵ / (1 - n) with n = ‖Q‖_F.
    const double n = q.norm().item<double>();
    ASSERT_LT(n, 0.5);
    const auto full = (eye + q).mm(torch::inverse(eye - q));
    const double err = (series[i] - full).norm().item<double>();
    EXPECT_LE(err, std::pow(n, 4) + 2 * std::pow(n, 5) / (1 - n));
    EXPECT_GT(err, 0.0);
    EXPECT_GT(max_diff(exact[i], eye), 1e-3);
  }
  // Terms 1 and 2: I and I + 2Q; 3 as 4 (PEFT's loop adds Q³ once either way).
  EXPECT_LE(max_diff(peft::oft::cayley(vec, b, true, 1)[0], eye), 0.0);
  EXPECT_LE(max_diff(peft::oft::cayley(vec, b, true, 2)[1], eye + 2 * skew_by_hand(vec[1], b)), 1e-15);
  EXPECT_LE(max_diff(peft::oft::cayley(vec, b, true, 3), peft::oft::cayley(vec, b, true, 4)), 0.0);
}

TEST(OFTMath, PeftsAdjustmentOfBlockSizeAndRank) {
  // adjust_oft_parameters: the nearest divisor, the lower one on a tie, in_features above it
  // (the values PEFT 0.21's OFTLayer.adjust_oft_parameters returns for these arguments).
  EXPECT_EQ(peft::oft::adjust(16, 5), 4);
  EXPECT_EQ(peft::oft::adjust(16, 3), 2);
  EXPECT_EQ(peft::oft::adjust(16, 7), 8);
  EXPECT_EQ(peft::oft::adjust(16, 40), 16);
  EXPECT_EQ(peft::oft::adjust(40, 6), 5);
  EXPECT_EQ(peft::oft::adjust(40, 3), 2);
  const auto a = peft::oft::resolve(16, 0, 5);
  EXPECT_EQ(a.block_size, 4);
  EXPECT_EQ(a.r, 4);
  const auto b = peft::oft::resolve(40, 3, 0);
  EXPECT_EQ(b.r, 2) << "3 on 40: 2 and 4 are as near, the lower wins";
  EXPECT_EQ(b.block_size, 20);
  const auto c = peft::oft::resolve(16, 0, 16);
  EXPECT_EQ(c.r, 1);
  EXPECT_EQ(peft::oft::weight_shape(peft::oft::resolve(16, 2, 0), false), (std::vector<int64_t>{2, 28}));
  EXPECT_EQ(peft::oft::weight_shape(peft::oft::resolve(16, 2, 0), true), (std::vector<int64_t>{1, 28}));
}

TEST(OFTMath, CoftProjectsEachBlockIntoItsBall) {
  torch::manual_seed(1);
  const int64_t b = 4;
  auto vec = torch::randn({4, 6});
  vec[2].mul_(1e-6);  // inside the ball: kept
  const double eps = 1e-3, radius = eps / 2.0;  // eps / sqrt(4 blocks)
  const auto out = peft::oft::project(vec, b, eps);
  for (int64_t i = 0; i < 4; ++i) {
    const double before = skew_by_hand(vec[i], b).norm().item<double>();
    const double after = skew_by_hand(out[i], b).norm().item<double>();
    if (before <= radius) {
      EXPECT_TRUE(torch::equal(out[i], vec[i])) << i;
    } else {
      EXPECT_NEAR(after, radius, 1e-9) << i;
      EXPECT_LE(max_diff(out[i] / after, vec[i] / before), 1e-6) << "the direction stays";
    }
  }
}

TEST(OFTLayer, ForwardRotatesTheInputBlockwiseWithPeftsKeys) {
  torch::manual_seed(2);
  d9d::nn::Linear base(12, 5);
  const auto w = base->weight.detach().clone(), bias = base->bias.detach().clone();
  peft::OFTLinearImpl layer(base.ptr(), peft::OFTParameters().oft_block_size(4).init_weights(false));
  EXPECT_EQ(layer.oft_R->weight.sizes(), (std::vector<int64_t>{3, 6}));
  std::vector<std::string> keys;
  for (const auto& p : layer.named_parameters()) keys.push_back(p.key());
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, (std::vector<std::string>{"base.bias", "base.weight", "oft_R.weight"})) << "PEFT's keys";
  torch::NoGradGuard g;
  const auto x = torch::randn({2, 3, 12});
  const auto rot = rotation_by_hand(layer.adapter("default"));
  EXPECT_LE(max_diff(layer.adapter("default").rotation(), rot), 1e-6);
  EXPECT_LE(max_diff(layer.forward(x), x.matmul(rot).matmul(w.t()) + bias), 1e-5);
  EXPECT_GT(max_diff(layer.forward(x), x.matmul(w.t()) + bias), 1e-3);

  for (const bool neumann : {false, true}) {
    d9d::nn::Linear shared_base(12, 3);
    peft::OFTLinearImpl shared(shared_base.ptr(), peft::OFTParameters().r(2).oft_block_size(0).block_share(true)
                                                      .use_cayley_neumann(neumann).num_cayley_neumann_terms(7)
                                                      .init_weights(false));
    EXPECT_EQ(shared.oft_R->weight.sizes(), (std::vector<int64_t>{1, 15})) << "one 6x6 block for both";
    const auto r2 = rotation_by_hand(shared.adapter("default"));
    EXPECT_LE(max_diff(r2.slice(0, 0, 6).slice(1, 0, 6), r2.slice(0, 6).slice(1, 6)), 0.0);
    EXPECT_LE(max_diff(shared.forward(x), x.matmul(r2).matmul(shared_base->weight.t()) + shared_base->bias), 1e-5);
  }
}

TEST(OFTLayer, PeftsDefaultInitIsANoOp) {
  torch::manual_seed(3);
  d9d::nn::Linear base(8, 3);
  const auto x = torch::randn({2, 8});
  const auto plain = base->forward(x).detach();
  peft::OFTLinearImpl layer(base.ptr(), peft::OFTParameters().oft_block_size(4));
  EXPECT_TRUE(torch::equal(layer.oft_R->weight, torch::zeros({2, 6})));
  EXPECT_TRUE(layer.oft_R->weight.requires_grad());
  EXPECT_TRUE(torch::equal(layer.forward(x).detach(), plain));
  peft::OFTLinearImpl drawn(d9d::nn::Linear(8, 3).ptr(), peft::OFTParameters().oft_block_size(4).init_weights(false));
  const double sd = drawn.oft_R->weight.std().item<double>();
  EXPECT_GT(sd, 0.02);
  EXPECT_LT(sd, 0.3) << "N(0, 0.1) as PEFT's init_weights=False";
}

TEST(OFTLayer, MergeUnmergeDeltaAndSeveralAdapters) {
  torch::manual_seed(4);
  d9d::nn::Linear base(8, 6);
  const auto w = base->weight.detach().clone(), bias = base->bias.detach().clone();
  peft::OFTLinearImpl layer(base.ptr(), peft::OFTParameters().oft_block_size(4).init_weights(false), "a");
  layer.add_adapter("b", peft::OFTParameters().r(0).oft_block_size(2).use_cayley_neumann(false).init_weights(false));
  layer.set_active_adapters({"a", "b"});
  EXPECT_TRUE(layer.adapter("b").oft_R->weight.requires_grad());
  EXPECT_EQ(layer.adapter("b").oft_R->weight.sizes(), (std::vector<int64_t>{4, 1}));
  torch::NoGradGuard g;
  const auto x = torch::randn({3, 8});
  const auto ra = rotation_by_hand(layer.adapter("a")), rb = rotation_by_hand(layer.adapter("b"));
  const auto out = layer.forward(x);
  EXPECT_LE(max_diff(out, x.mm(ra).mm(rb).mm(w.t()) + bias), 1e-5) << "rotations applied in adapter order";

  layer.set_active_adapters({"a"});
  const auto only_a = layer.forward(x);
  EXPECT_LE(max_diff(layer.delta_weight("a"), w.mm(ra.t()) - w), 1e-6);
  layer.merge_adapter("a");
  EXPECT_LE(max_diff(base->weight, w.mm(ra.t())), 1e-6) << "PEFT's merge: (R @ Wᵀ)ᵀ";
  EXPECT_TRUE(torch::equal(base->bias, bias)) << "OFT's merge leaves the bias";
  EXPECT_LE(max_diff(layer.forward(x), only_a), 1e-5);
  EXPECT_THAT([&] { layer.merge_adapter("a"); }, ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("a")));
  layer.unmerge_adapter("a");
  EXPECT_LE(max_diff(base->weight, w), 1e-5) << "unmerge applies R⁻¹";

  layer.set_adapters_enabled(false);
  EXPECT_LE(max_diff(layer.forward(x), x.mm(w.t()) + bias), 1e-5) << "disabled: the base alone";
  layer.set_adapters_enabled(true);
  EXPECT_THAT([&] { layer.add_adapter("c", peft::IA3Parameters()); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("takes OFTParameters")));
  EXPECT_THAT([&] { layer.add_adapter("c", peft::OFTParameters().r(2).oft_block_size(4)); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("add_adapter(\"c\").oft_block_size: exactly one of r and oft_block_size")));
}

TEST(OFTLayer, CoftProjectsTheWeightInForwardAsPeftDoes) {
  torch::manual_seed(5);
  d9d::nn::Linear base(8, 4);
  peft::OFTLinearImpl layer(base.ptr(), peft::OFTParameters().oft_block_size(4).coft(true).eps(1e-2).init_weights(false));
  const auto before = layer.oft_R->weight.detach().clone();
  torch::NoGradGuard g;
  const auto x = torch::randn({2, 8});
  const auto expected = peft::oft::project(before, 4, 1e-2);
  layer.forward(x);
  EXPECT_TRUE(torch::equal(layer.oft_R->weight, expected)) << "the projection is written into the parameter";
  EXPECT_LE(skew_by_hand(layer.oft_R->weight[0], 4).norm().item<double>(), 1e-2 / std::sqrt(2.0) + 1e-7);
  const auto rot = rotation_by_hand(layer.adapter("default"));
  EXPECT_LE(max_diff(layer.forward(x), x.mm(rot).mm(base->weight.t()) + base->bias), 1e-6);
}
