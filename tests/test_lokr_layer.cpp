// LoKr's arithmetic and layer: PEFT's factorization and factor layout
// against tables of PEFT's own output, the layer against ΔW written out from
// the definition of the Kronecker product, PEFT's inits, several adapters,
// merge, and the train-mode dropouts against PEFT's draws. Files, training
// and configs are in test_lokr.cpp.
#include <d9d/peft.h>

#include <torch/nn/functional/linear.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>

namespace peft = d9d::peft;
using ::testing::HasSubstr;

namespace {

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

/// The Kronecker product by its definition, kron(A, B)[i·b + k, j·d + l] = A[i, j] · B[k, l].
at::Tensor kron_by_definition(const at::Tensor& a, const at::Tensor& b) {
  return (a.unsqueeze(1).unsqueeze(3) * b.unsqueeze(0).unsqueeze(2)).reshape({a.size(0) * b.size(0), a.size(1) * b.size(1)});
}

/// PEFT's get_delta_weight written out: kron(w1, w2) · alpha / r, each factor whole or a product.
at::Tensor formula(const peft::LoKrAdapterImpl& a) {
  const auto w1 = a.lokr_w1.defined() ? a.lokr_w1 : a.lokr_w1_a.mm(a.lokr_w1_b);
  const auto w2 = a.lokr_w2.defined() ? a.lokr_w2 : a.lokr_w2_a.mm(a.lokr_w2_b);
  return kron_by_definition(w1, w2) * (a.options().alpha() / a.options().r());
}

std::map<std::string, std::vector<int64_t>> factor_shapes(const torch::nn::Module& m) {
  std::map<std::string, std::vector<int64_t>> out;
  for (const auto& p : m.named_parameters(/*recurse=*/false)) out[p.key()] = p.value().sizes().vec();
  return out;
}

}  // namespace

TEST(LoKrMath, FactorizationIsPeftsTable) {
  // PEFT 0.21's own output: [factorization(n, f) for f in (-1, 0, -2, 1, 2, 3, 4, 8, 16)]
  // from peft.tuners.lokr.layer, for each n below.
  const std::vector<int64_t> factors = {-1, 0, -2, 1, 2, 3, 4, 8, 16};
  const std::vector<std::pair<int64_t, std::vector<std::pair<int64_t, int64_t>>>> table = {
      {1, {{1, 1}, {1, 1}, {1, 1}, {1, 1}, {1, 1}, {1, 1}, {1, 1}, {1, 1}, {1, 1}}},
      {2, {{1, 2}, {1, 2}, {1, 2}, {1, 2}, {2, 1}, {1, 2}, {1, 2}, {1, 2}, {1, 2}}},
      {7, {{1, 7}, {1, 7}, {1, 7}, {1, 7}, {1, 7}, {1, 7}, {1, 7}, {1, 7}, {1, 7}}},
      {12, {{3, 4}, {1, 12}, {1, 12}, {1, 12}, {2, 6}, {3, 4}, {4, 3}, {3, 4}, {3, 4}}},
      {16, {{4, 4}, {1, 16}, {1, 16}, {1, 16}, {2, 8}, {2, 8}, {4, 4}, {8, 2}, {16, 1}}},
      {40, {{5, 8}, {1, 40}, {1, 40}, {1, 40}, {2, 20}, {2, 20}, {4, 10}, {8, 5}, {5, 8}}},
      {64, {{8, 8}, {1, 64}, {1, 64}, {1, 64}, {2, 32}, {2, 32}, {4, 16}, {8, 8}, {16, 4}}},
      {96, {{8, 12}, {1, 96}, {1, 96}, {1, 96}, {2, 48}, {3, 32}, {4, 24}, {8, 12}, {16, 6}}},
      {100, {{10, 10}, {1, 100}, {1, 100}, {1, 100}, {2, 50}, {2, 50}, {4, 25}, {5, 20}, {10, 10}}},
      {127, {{1, 127}, {1, 127}, {1, 127}, {1, 127}, {1, 127}, {1, 127}, {1, 127}, {1, 127}, {1, 127}}},
      {128, {{8, 16}, {1, 128}, {1, 128}, {1, 128}, {2, 64}, {2, 64}, {4, 32}, {8, 16}, {16, 8}}},
      {256, {{16, 16}, {1, 256}, {1, 256}, {1, 256}, {2, 128}, {2, 128}, {4, 64}, {8, 32}, {16, 16}}},
      {4096, {{64, 64}, {1, 4096}, {1, 4096}, {1, 4096}, {2, 2048}, {2, 2048}, {4, 1024}, {8, 512}, {16, 256}}},
  };
  for (const auto& row : table) {
    for (size_t i = 0; i < factors.size(); ++i) {
      EXPECT_EQ(peft::lokr::factorization(row.first, factors[i]), row.second[i])
          << "factorization(" << row.first << ", " << factors[i] << ")";
    }
  }
}

TEST(LoKrLayer, FactorLayoutIsPeftsForEveryRule) {
  // PEFT 0.21: get_peft_model(Sequential(Linear(in, out)), LoKrConfig(target_modules=["0"], r=r,
  // alpha=r, decompose_both=both, decompose_factor=factor)), its lokr_* parameter shapes.
  struct Row {
    int64_t in, out, r;
    bool both;
    int64_t factor;
    std::map<std::string, std::vector<int64_t>> shapes;
  };
  const std::vector<Row> table = {
      {16, 16, 4, false, -1, {{"lokr_w1", {4, 4}}, {"lokr_w2", {4, 4}}}},
      {16, 40, 4, false, -1, {{"lokr_w1", {5, 4}}, {"lokr_w2", {8, 4}}}},
      {16, 40, 3, false, -1, {{"lokr_w1", {5, 4}}, {"lokr_w2_a", {8, 3}}, {"lokr_w2_b", {3, 4}}}},
      {16, 16, 1, false, -1, {{"lokr_w1", {4, 4}}, {"lokr_w2_a", {4, 1}}, {"lokr_w2_b", {1, 4}}}},
      {16, 16, 1, true, -1, {{"lokr_w1_a", {4, 1}}, {"lokr_w1_b", {1, 4}}, {"lokr_w2_a", {4, 1}}, {"lokr_w2_b", {1, 4}}}},
      {64, 64, 3, true, -1, {{"lokr_w1_a", {8, 3}}, {"lokr_w1_b", {3, 8}}, {"lokr_w2_a", {8, 3}}, {"lokr_w2_b", {3, 8}}}},
      {64, 64, 4, true, -1, {{"lokr_w1", {8, 8}}, {"lokr_w2", {8, 8}}}},
      {64, 64, 3, false, -1, {{"lokr_w1", {8, 8}}, {"lokr_w2_a", {8, 3}}, {"lokr_w2_b", {3, 8}}}},
      {40, 16, 2, true, 8, {{"lokr_w1_a", {8, 2}}, {"lokr_w1_b", {2, 8}}, {"lokr_w2_a", {2, 2}}, {"lokr_w2_b", {2, 5}}}},
      {24, 36, 2, true, 2, {{"lokr_w1", {2, 2}}, {"lokr_w2_a", {18, 2}}, {"lokr_w2_b", {2, 12}}}},
      {128, 96, 5, true, -1, {{"lokr_w1", {8, 8}}, {"lokr_w2_a", {12, 5}}, {"lokr_w2_b", {5, 16}}}},
      {127, 12, 1, true, -1, {{"lokr_w1_a", {3, 1}}, {"lokr_w1_b", {1, 1}}, {"lokr_w2_a", {4, 1}}, {"lokr_w2_b", {1, 127}}}},
      {12, 127, 30, false, -1, {{"lokr_w1", {1, 3}}, {"lokr_w2_a", {127, 30}}, {"lokr_w2_b", {30, 4}}}},
      {16, 16, 8, true, 16, {{"lokr_w1", {16, 16}}, {"lokr_w2", {1, 1}}}},
  };
  for (const auto& row : table) {
    d9d::nn::Linear base(row.in, row.out);
    peft::LoKrLinearImpl layer(base.ptr(), peft::LoKrParameters().r(row.r).alpha(row.r).decompose_both(row.both)
                                               .decompose_factor(row.factor));
    EXPECT_EQ(factor_shapes(layer), row.shapes) << "Linear(" << row.in << ", " << row.out << "), r " << row.r << ", decompose_both "
                                  << row.both << ", decompose_factor " << row.factor;
    EXPECT_EQ(layer.delta_weight("default").sizes(), base->weight.sizes());
  }
}

TEST(LoKrLayer, ForwardIsBasePlusTheKroneckerDelta) {
  torch::manual_seed(0);
  for (const bool both : {false, true}) {
    // 12 = 3·4 in, 10 = 2·5 out; r 1 factors both sides (with decompose_both).
    d9d::nn::Linear base(12, 10);
    const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
    peft::LoKrLinearImpl layer(base.ptr(), peft::LoKrParameters().r(1).alpha(3).decompose_both(both)
                                               .init_weights(peft::LoKrInit::kRandom));
    EXPECT_EQ(layer.lokr_w1.defined(), !both);
    EXPECT_TRUE(layer.lokr_w2_a.defined());
    torch::NoGradGuard g;
    const auto x = torch::randn({4, 12});
    const auto delta = formula(layer.adapter("default"));
    EXPECT_GT(delta.abs().max().item<double>(), 1e-3);
    EXPECT_LE(max_diff(layer.delta_weight("default"), delta), 1e-6);
    EXPECT_LE(max_diff(layer.forward(x), x.mm(w.t()) + b + x.mm(delta.t())), 1e-5);
  }
  // Whole factors keep the alpha / r scale (PEFT has no special case for them).
  d9d::nn::Linear base(16, 16);
  peft::LoKrLinearImpl layer(base.ptr(), peft::LoKrParameters().r(8).alpha(2).init_weights(peft::LoKrInit::kRandom));
  ASSERT_TRUE(layer.lokr_w1.defined() && layer.lokr_w2.defined());
  EXPECT_LE(max_diff(layer.delta_weight("default"), kron_by_definition(layer.lokr_w1, layer.lokr_w2) * 0.25), 1e-6);
}

TEST(LoKrLayer, PeftsInitsAreNoOpsWithTheRightFactorZero) {
  torch::manual_seed(1);
  d9d::nn::Linear base(16, 16);
  const auto x = torch::randn({2, 16});
  const auto plain = base->forward(x).detach();
  // init_weights=True: w1 (or w1_a) zeros, w2 kaiming-uniform.
  peft::LoKrLinearImpl whole(base.ptr(), peft::LoKrParameters().r(4).alpha(4));
  EXPECT_TRUE(torch::equal(whole.lokr_w1, torch::zeros({4, 4})));
  EXPECT_GT(whole.lokr_w2.abs().min().item<double>(), 0.0);
  EXPECT_LE(whole.lokr_w2.abs().max().item<double>(), 0.5) << "kaiming-uniform(a=sqrt(5)), fan_in 4: bound 1/2";
  EXPECT_TRUE(torch::equal(whole.forward(x).detach(), plain));
  d9d::nn::Linear base2(64, 64);
  peft::LoKrLinearImpl split(base2.ptr(), peft::LoKrParameters().r(2).decompose_both(true));
  EXPECT_TRUE(torch::equal(split.lokr_w1_a, torch::zeros({8, 2})));
  EXPECT_GT(split.lokr_w1_b.abs().sum().item<double>(), 0.0);
  EXPECT_TRUE(torch::equal(split.delta_weight("default"), torch::zeros({64, 64})));
  // init_weights="lycoris": w2 (or w2_b) zeros, w1 drawn.
  d9d::nn::Linear base3(64, 64);
  peft::LoKrLinearImpl lycoris(base3.ptr(), peft::LoKrParameters().r(2).decompose_both(true)
                                                .init_weights(peft::LoKrInit::kLycoris));
  EXPECT_TRUE(torch::equal(lycoris.lokr_w2_b, torch::zeros({2, 8})));
  EXPECT_GT(lycoris.lokr_w1_a.abs().sum().item<double>(), 0.0);
  EXPECT_GT(lycoris.lokr_w2_a.abs().sum().item<double>(), 0.0);
  EXPECT_TRUE(torch::equal(lycoris.delta_weight("default"), torch::zeros({64, 64})));
}

TEST(LoKrLayer, SeveralAdaptersAddAndMergeRoundTrips) {
  torch::manual_seed(2);
  d9d::nn::Linear base(8, 6);
  const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
  peft::LoKrLinearImpl layer(base.ptr(), peft::LoKrParameters().r(1).alpha(3).init_weights(peft::LoKrInit::kRandom), "a");
  layer.add_adapter("b", peft::LoKrParameters().r(4).alpha(1).init_weights(peft::LoKrInit::kRandom));
  layer.set_active_adapters({"a", "b"});
  EXPECT_TRUE(layer.adapter("b").lokr_w2.requires_grad());
  auto keys = factor_shapes(layer);
  EXPECT_EQ(keys.count("lokr_w2_a"), 1u) << "the first adapter's keys sit on the layer";
  EXPECT_EQ(keys.count("lokr_w2"), 0u);
  torch::NoGradGuard g;
  const auto x = torch::randn({3, 8});
  const auto da = formula(layer.adapter("a")), db = formula(layer.adapter("b"));
  const auto out = layer.forward(x);
  EXPECT_LE(max_diff(out, x.mm((w + da + db).t()) + b), 1e-5);

  layer.merge_adapter("a");
  EXPECT_LE(max_diff(base->weight, w + da), 1e-6);
  EXPECT_TRUE(torch::equal(base->bias, b)) << "LoKr's merge leaves the bias";
  EXPECT_LE(max_diff(layer.forward(x), out), 1e-5) << "a merged, b still computed";
  EXPECT_THAT([&] { layer.merge_adapter("a"); }, ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("a")));
  layer.unmerge_adapter("a");
  EXPECT_LE(max_diff(base->weight, w), 1e-6);
  layer.delete_adapter("a");
  EXPECT_EQ(factor_shapes(layer).count("lokr_w2"), 1u) << "b moved to the top, with its own layout";
  EXPECT_EQ(factor_shapes(layer).count("lokr_w2_a"), 0u);

  layer.set_adapters_enabled(false);
  EXPECT_LE(max_diff(layer.forward(x), x.mm(w.t()) + b), 1e-6) << "disabled: the base alone";
  layer.set_adapters_enabled(true);
  EXPECT_THAT([&] { layer.add_adapter("c", peft::LoHaParameters()); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("takes LoKrParameters")));
  EXPECT_THAT([&] { layer.add_adapter("c", peft::LoKrParameters().r(0)); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("add_adapter(\"c\").r: must be an integer >= 1")));
}

TEST(LoKrLayer, TrainModeDropoutsFollowPeftsDraws) {
  torch::manual_seed(3);
  for (const bool scale : {false, true}) {
    d9d::nn::Linear base(6, 8);
    const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
    peft::LoKrLinearImpl layer(base.ptr(), peft::LoKrParameters().r(2).alpha(2).rank_dropout(0.5)
                                               .rank_dropout_scale(scale).init_weights(peft::LoKrInit::kRandom));
    layer.train();
    torch::NoGradGuard g;
    const auto x = torch::randn({3, 6});
    const auto delta = formula(layer.adapter("default"));
    // PEFT: torch.rand(1) for module dropout, then (torch.rand(out) > p).float(),
    // divided by its mean with rank_dropout_scale.
    torch::manual_seed(7);
    at::rand({1});
    auto keep = (at::rand({8}) > 0.5).to(at::kFloat);
    if (scale) keep = keep / keep.mean();
    torch::manual_seed(7);
    const auto out = layer.forward(x);
    EXPECT_LE(max_diff(out, x.mm(w.t()) + b + x.mm((delta * keep.view({-1, 1})).t())), 1e-5) << scale;
    EXPECT_GT(max_diff(out, x.mm((w + delta).t()) + b), 1e-4) << "rows were dropped";
    layer.eval();
    EXPECT_LE(max_diff(layer.forward(x), x.mm((w + delta).t()) + b), 1e-5) << "no dropout in eval";
  }

  d9d::nn::Linear base(6, 8);
  peft::LoKrLinearImpl skipping(base.ptr(), peft::LoKrParameters().init_weights(peft::LoKrInit::kRandom).module_dropout(0.5));
  skipping.train();
  torch::NoGradGuard g;
  const auto x = torch::randn({3, 6});
  int skipped = 0;
  torch::manual_seed(11);
  const auto draws = at::rand({40});
  torch::manual_seed(11);
  for (int i = 0; i < 40; ++i) {
    const bool skip = !(draws[i].item<double>() > 0.5);
    const bool same = torch::equal(skipping.forward(x), torch::nn::functional::linear(x, base->weight, base->bias));
    EXPECT_EQ(same, skip) << "call " << i;
    skipped += skip;
  }
  EXPECT_GT(skipped, 5);
  EXPECT_LT(skipped, 35);
}
