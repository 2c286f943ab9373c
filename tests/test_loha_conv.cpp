// LoHa on Conv2d: the layer against PEFT's formulas (the delta rebuilt here
// with matrix products, the CP form without einsum, the forward as two plain
// convolutions), merging, rank dropout in training, training, files and the
// offline merge, and the refusal of a padding mode PEFT cannot merge. Real
// PEFT's numbers are checked by tests/peft_reference (generate_conv.py's LoHa
// cases, both ways).
#include "conv_fixture.h"

#include <gtest/gtest.h>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using torch::nn::Conv2dOptions;
using namespace d9d_test;

namespace {

const auto& max_diff = conv_max_diff;
const auto& conv = plain_conv;

/// Grouped, dilated, strided, 1×1, rectangular kernels, with and without bias.
std::vector<Conv2dOptions> geometries() {
  return {
      Conv2dOptions(4, 6, 3).padding(1),
      Conv2dOptions(4, 6, 3).groups(2).stride(2),
      Conv2dOptions(6, 6, 3).groups(3).padding(2).dilation(2),
      Conv2dOptions(4, 8, 1).groups(4).bias(false),
      Conv2dOptions(4, 6, {3, 2}).padding({1, 0}),
  };
}

/// PEFT's delta of adapter `a` on a weight of `shape`, written without the
/// library: flat `(w1_a w1_b) ⊙ (w2_a w2_b) · alpha/r` reshaped, or the CP
/// form `Σ_pq t[p,q,h,w] a[p,o] b[q,i]` as batched matrix products.
at::Tensor expected_delta(const peft::LoHaAdapterImpl& a, at::IntArrayRef shape) {
  const double scale = a.options().alpha() / static_cast<double>(a.options().r());
  if (!a.cp()) {
    return (a.hada_w1_a.mm(a.hada_w1_b) * a.hada_w2_a.mm(a.hada_w2_b) * scale).reshape(shape);
  }
  auto rebuild = [](const at::Tensor& t, const at::Tensor& wa, const at::Tensor& wb) {
    // [h, w, p, q] @ [q, i] -> [h, w, p, i]; [o, p] @ that -> [h, w, o, i].
    return at::matmul(wa.t(), at::matmul(t.permute({2, 3, 0, 1}), wb)).permute({2, 3, 0, 1});
  };
  return rebuild(a.hada_t1, a.hada_w1_a, a.hada_w1_b) * rebuild(a.hada_t2, a.hada_w2_a, a.hada_w2_b) * scale;
}

peft::LoHaParameters drawn(bool cp) { return peft::LoHaParameters().r(2).alpha(3).use_effective_conv2d(cp).init_weights(false); }

}  // namespace

TEST(LoHaConv2dLayer, ForwardIsTheBasePlusTheDeltaConvolutionFlatOrCp) {
  torch::manual_seed(40);
  for (const auto& o : geometries()) {
    for (const bool cp : {false, true}) {
      d9d::nn::Conv2d base(o);
      peft::LoHaConv2dImpl layer(base.ptr(), drawn(cp));
      const auto& a = layer.adapter(peft::kDefaultAdapterName);
      const auto& w = base->weight;
      const bool one_by_one = w.size(2) == 1 && w.size(3) == 1;
      ASSERT_EQ(a.cp(), cp && !one_by_one) << "PEFT keeps 1x1 kernels flat";
      if (a.cp()) {
        EXPECT_EQ(layer.hada_t1.sizes(), (std::vector<int64_t>{2, 2, w.size(2), w.size(3)}));
        EXPECT_EQ(layer.hada_w1_a.sizes(), (std::vector<int64_t>{2, w.size(0)}));
        EXPECT_EQ(layer.hada_w2_b.sizes(), (std::vector<int64_t>{2, w.size(1)}));
      } else {
        EXPECT_FALSE(layer.hada_t1.defined());
        EXPECT_EQ(layer.hada_w1_a.sizes(), (std::vector<int64_t>{w.size(0), 2}));
        EXPECT_EQ(layer.hada_w2_b.sizes(), (std::vector<int64_t>{2, w.size(1) * w.size(2) * w.size(3)}));
      }
      torch::NoGradGuard g;
      const auto delta = expected_delta(a, w.sizes());
      EXPECT_LE(max_diff(layer.delta_weight(peft::kDefaultAdapterName), delta), 1e-6);
      const auto x = torch::randn({2, o.in_channels(), 9, 8});
      const auto want = conv(x, w, base->bias, o) + conv(x, delta, at::Tensor(), o);
      EXPECT_LE(max_diff(layer.forward(x), want), 1e-5) << o.in_channels() << "->" << o.out_channels() << " cp=" << cp;
      EXPECT_GT(max_diff(layer.forward(x), conv(x, w, base->bias, o)), 1e-3) << "the adapter changes the output";
    }
  }
}

TEST(LoHaConv2dLayer, MergeUnmergeAndRankDropoutInTraining) {
  torch::manual_seed(41);
  const Conv2dOptions o = Conv2dOptions(4, 6, 3).groups(2).padding(1);
  for (const bool cp : {false, true}) {
    d9d::nn::Conv2d base(o);
    peft::LoHaConv2dImpl layer(base.ptr(), drawn(cp).rank_dropout(0.5));
    expect_merge_and_rank_dropout(layer, base, o, [&] {
      return expected_delta(layer.adapter(peft::kDefaultAdapterName), base->weight.sizes());
    });
  }
}

TEST(LoHaConv2dMethod, TrainingLowersTheLossChangesOnlyTheFactorsAndMerges) {
  convnet::ConvNet model = conv_base();
  torch::manual_seed(42);
  peft::hf::LoHaConfig config;
  config.target_modules.names = {"conv1", "conv2", "head"};
  config.r = 2;
  config.alpha = 4;
  config.use_effective_conv2d = true;
  peft::LoHa loha(config);
  peft::inject_peft_and_freeze(loha, model);
  auto* conv1 = model->named_modules()["conv1"]->as<peft::LoHaConv2dImpl>();
  ASSERT_NE(conv1, nullptr);
  EXPECT_TRUE(conv1->adapter(peft::kDefaultAdapterName).cp());
  EXPECT_NE(model->named_modules()["head"]->as<peft::LoHaLinearImpl>(), nullptr);
  ASSERT_EQ(peft::trainable_parameters(*model).size(), 6u + 6u + 4u);
  expect_conv_training_and_merge(model, loha, "hada_", 1e-2);
}

TEST(LoHaConv2dMethod, AReflectPaddedConvIsRefusedBeforeAnyLayerChanges) {
  peft::hf::LoHaConfig config;
  config.target_modules.names = {"head", "conv"};
  expect_conv_refused_before_any_layer_changes<peft::LoHa>(
      config, Conv2dOptions(3, 4, 3).padding(1).padding_mode(torch::kReflect),
      {"LoHa: 'conv'", "padding_mode kReflect", "padding_mode zeros only"});
}

TEST(LoHaConv2dFiles, SaveLoadAndOfflineMergeAgreeWithTheModel) {
  convnet::ConvNet model = conv_base();
  peft::hf::LoHaConfig config;
  config.target_modules.names = {"conv1", "conv2"};
  config.r = 3;
  config.alpha = 2;
  config.use_effective_conv2d = true;
  config.rank_pattern = {{"conv2", 2}};
  config.init_weights = false;
  torch::manual_seed(43);
  peft::LoHa loha(config);
  peft::inject_peft_and_freeze(loha, model);
  TempDir dir;
  expect_files_round_trip(model, loha, dir);
  const auto written = nlohmann::json::parse(read_bytes(dir / "adapter/adapter_config.json"));
  EXPECT_EQ(written["peft_type"], "LOHA");
  EXPECT_EQ(written["use_effective_conv2d"], true);
  const auto weights = ms::SafetensorsFile::open(dir / "adapter/adapter_model.safetensors");
  EXPECT_EQ(weights->get("base_model.model.conv1.hada_t1").sizes(), (std::vector<int64_t>{3, 3, 3, 3}));
  EXPECT_EQ(weights->get("base_model.model.conv2.hada_t2").sizes(), (std::vector<int64_t>{2, 2, 3, 3}));
  EXPECT_EQ(weights->get("base_model.model.conv2.hada_w1_a").sizes(), (std::vector<int64_t>{2, 8}));
  EXPECT_EQ(weights->get("base_model.model.conv1.hada_w2_b").sizes(), (std::vector<int64_t>{3, 3}));
  expect_offline_merge_refuses_a_5x5_conv1(
      dir, {"conv1.weight", "[8, 3, 5, 5]", "hada_t1 [3, 3, 3, 3]", "hada_t1 [3, 3, 5, 5]", "the CP form"});
}
