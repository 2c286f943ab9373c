// LoKr on Conv2d: the layer against PEFT's formulas (the Kronecker product
// written as a broadcast product, the CP core as matrix products, the forward
// as two plain convolutions) in each of PEFT's layouts (w2 whole, factored
// flat, CP; w1 whole or factored), merging, rank dropout in training,
// training, files and the offline merge, and the refusal of a padding mode
// PEFT cannot merge. Real PEFT's numbers are checked by tests/peft_reference
// (generate_conv.py's LoKr cases, both ways).
#include "conv_fixture.h"

#include <gtest/gtest.h>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using torch::nn::Conv2dOptions;
using namespace d9d_test;

namespace {

const auto& max_diff = conv_max_diff;
const auto& conv = plain_conv;

std::vector<int64_t> dims(const at::Tensor& t) { return t.sizes().vec(); }

/// PEFT's delta of adapter `a` on a Conv2d weight of `shape`, written without
/// the library's kron and einsum: `ΔW[i·b+p, j·d+q, h, w] = w1[i,j] ·
/// w2[p,q,h,w] · alpha/r`, with `w2` whole, flat `(w2_a w2_b)` reshaped, or
/// the CP form `Σ_xy t2[x,y,h,w] w2_a[x,p] w2_b[y,q]` as matrix products.
at::Tensor expected_delta(const peft::LoKrAdapterImpl& a, at::IntArrayRef shape) {
  const auto& s = a.shape();
  const at::Tensor w1 = a.lokr_w1.defined() ? a.lokr_w1 : a.lokr_w1_a.mm(a.lokr_w1_b);
  at::Tensor w2;
  if (a.lokr_w2.defined()) {
    w2 = a.lokr_w2;
  } else if (a.lokr_t2.defined()) {
    // [h, w, x, y] @ [y, q] -> [h, w, x, q]; [p, x] @ that -> [h, w, p, q].
    w2 = at::matmul(a.lokr_w2_a.t(), at::matmul(a.lokr_t2.permute({2, 3, 0, 1}), a.lokr_w2_b)).permute({2, 3, 0, 1});
  } else {
    w2 = a.lokr_w2_a.mm(a.lokr_w2_b).reshape({s.b, s.d, s.kh, s.kw});
  }
  const double scale = a.options().alpha() / static_cast<double>(a.options().r());
  return (w1.view({s.a, 1, s.c, 1, 1, 1}) * w2.view({1, s.b, 1, s.d, s.kh, s.kw})).reshape(shape) * scale;
}

struct Layout {
  Conv2dOptions conv;
  peft::LoKrParameters options;
  const char* what;
};

/// Each of PEFT's layouts on grouped, dilated, strided, 1×1 and rectangular kernels.
std::vector<Layout> layouts() {
  auto drawn = [](int64_t r) { return peft::LoKrParameters().r(r).alpha(3).init_weights(peft::LoKrInit::kRandom); };
  return {
      {Conv2dOptions(4, 6, 3).padding(1), drawn(2), "w2 whole [3, 2, 3, 3]"},
      {Conv2dOptions(8, 8, 3).groups(2).stride(2), drawn(1), "w2 factored flat"},
      {Conv2dOptions(8, 8, 3).groups(2).stride(2), drawn(1).use_effective_conv2d(true), "w2 in CP form"},
      {Conv2dOptions(6, 6, 3).groups(3).padding(2).dilation(2), drawn(1).use_effective_conv2d(true), "CP, dilated"},
      {Conv2dOptions(16, 16, 3).padding(1), drawn(1).decompose_both(true).use_effective_conv2d(true),
       "w1 factored, w2 CP"},
      {Conv2dOptions(8, 8, 1).bias(false), drawn(1).use_effective_conv2d(true), "1x1: flat despite the flag"},
      {Conv2dOptions(4, 8, {3, 2}).padding({1, 0}), drawn(1).decompose_factor(2), "rectangular, decompose_factor"},
  };
}

}  // namespace

TEST(LoKrConv2dLayer, ForwardIsTheBasePlusTheDeltaConvolutionInEachLayout) {
  torch::manual_seed(50);
  for (const auto& l : layouts()) {
    d9d::nn::Conv2d base(l.conv);
    peft::LoKrConv2dImpl layer(base.ptr(), l.options);
    const auto& a = layer.adapter(peft::kDefaultAdapterName);
    const auto& s = a.shape();
    const auto& w = base->weight;
    EXPECT_EQ(s.a * s.b, w.size(0)) << l.what;
    EXPECT_EQ(s.c * s.d, w.size(1)) << l.what;
    const bool one_by_one = w.size(2) == 1 && w.size(3) == 1;
    EXPECT_EQ(layer.lokr_t2.defined(), l.options.use_effective_conv2d() && !one_by_one && !s.whole_w2) << l.what;
    if (s.whole_w2) {
      EXPECT_EQ(dims(layer.lokr_w2), (std::vector<int64_t>{s.b, s.d, w.size(2), w.size(3)})) << l.what;
    } else if (layer.lokr_t2.defined()) {
      EXPECT_EQ(dims(layer.lokr_t2), (std::vector<int64_t>{1, 1, w.size(2), w.size(3)})) << l.what;
      EXPECT_EQ(dims(layer.lokr_w2_a), (std::vector<int64_t>{1, s.b})) << l.what;
      EXPECT_EQ(dims(layer.lokr_w2_b), (std::vector<int64_t>{1, s.d})) << l.what;
    } else {
      EXPECT_EQ(dims(layer.lokr_w2_a), (std::vector<int64_t>{s.b, l.options.r()})) << l.what;
      EXPECT_EQ(dims(layer.lokr_w2_b), (std::vector<int64_t>{l.options.r(), s.d * w.size(2) * w.size(3)})) << l.what;
    }
    EXPECT_EQ(layer.lokr_w1.defined(), s.whole_w1) << l.what;
    torch::NoGradGuard g;
    const auto delta = expected_delta(a, w.sizes());
    EXPECT_LE(max_diff(layer.delta_weight(peft::kDefaultAdapterName), delta), 1e-6) << l.what;
    const auto x = torch::randn({2, l.conv.in_channels(), 9, 8});
    const auto plain = conv(x, w, base->bias, l.conv);
    EXPECT_LE(max_diff(layer.forward(x), plain + conv(x, delta, at::Tensor(), l.conv)), 1e-5) << l.what;
    EXPECT_GT(max_diff(layer.forward(x), plain), 1e-3) << l.what << ": the adapter changes the output";
  }
}

TEST(LoKrConv2dLayer, MergeUnmergeAndRankDropoutInTraining) {
  torch::manual_seed(51);
  const Conv2dOptions o = Conv2dOptions(8, 6, 3).groups(2).padding(1);
  for (const bool cp : {false, true}) {
    d9d::nn::Conv2d base(o);
    peft::LoKrConv2dImpl layer(base.ptr(), peft::LoKrParameters()
                                               .r(1)
                                               .alpha(2)
                                               .use_effective_conv2d(cp)
                                               .rank_dropout(0.5)
                                               .rank_dropout_scale(true)
                                               .init_weights(peft::LoKrInit::kRandom));
    EXPECT_EQ(layer.lokr_t2.defined(), cp);
    expect_merge_and_rank_dropout(layer, base, o, [&] {
      return expected_delta(layer.adapter(peft::kDefaultAdapterName), base->weight.sizes());
    });
  }
}

TEST(LoKrConv2dMethod, TrainingLowersTheLossChangesOnlyTheFactorsAndMerges) {
  convnet::ConvNet model = conv_base();
  torch::manual_seed(52);
  peft::hf::LoKrConfig config;
  config.target_modules.names = {"conv1", "conv2", "head"};
  config.r = 1;
  config.alpha = 2;
  config.use_effective_conv2d = true;
  peft::LoKr lokr(config);
  peft::inject_peft_and_freeze(lokr, model);
  auto* conv1 = model->named_modules()["conv1"]->as<peft::LoKrConv2dImpl>();
  ASSERT_NE(conv1, nullptr);
  EXPECT_TRUE(conv1->lokr_t2.defined());
  EXPECT_NE(model->named_modules()["head"]->as<peft::LoKrLinearImpl>(), nullptr);
  // conv1 and conv2: lokr_w1, lokr_w2_a, lokr_w2_b, lokr_t2; head: lokr_w1, lokr_w2_a, lokr_w2_b.
  ASSERT_EQ(peft::trainable_parameters(*model).size(), 4u + 4u + 3u);
  expect_conv_training_and_merge(model, lokr, "lokr_", 1e-2);
}

TEST(LoKrConv2dMethod, ACircularPaddedConvIsRefusedBeforeAnyLayerChanges) {
  peft::hf::LoKrConfig config;
  config.target_modules.names = {"head", "conv"};
  expect_conv_refused_before_any_layer_changes<peft::LoKr>(
      config, Conv2dOptions(3, 4, 3).padding(1).padding_mode(torch::kCircular),
      {"LoKr: 'conv'", "padding_mode kCircular", "padding_mode zeros only"});
}

TEST(LoKrConv2dFiles, SaveLoadAndOfflineMergeAgreeWithTheModel) {
  convnet::ConvNet model = conv_base();
  peft::hf::LoKrConfig config;
  config.target_modules.names = {"conv1", "conv2"};
  config.r = 1;
  config.alpha = 2;
  config.use_effective_conv2d = true;
  config.rank_pattern = {{"conv2", 4}};  // conv2's w2 whole
  config.init_weights = peft::LoKrInit::kRandom;
  torch::manual_seed(53);
  peft::LoKr lokr(config);
  peft::inject_peft_and_freeze(lokr, model);
  TempDir dir;
  expect_files_round_trip(model, lokr, dir);
  const auto written = nlohmann::json::parse(read_bytes(dir / "adapter/adapter_config.json"));
  EXPECT_EQ(written["peft_type"], "LOKR");
  EXPECT_EQ(written["use_effective_conv2d"], true);
  const auto weights = ms::SafetensorsFile::open(dir / "adapter/adapter_model.safetensors");
  // conv1 [8, 3, 3, 3]: out 8 = 2·4, in 3 = 1·3; r 1 < 4/2, so w2 factored, in CP form.
  EXPECT_EQ(dims(weights->get("base_model.model.conv1.lokr_t2")), (std::vector<int64_t>{1, 1, 3, 3}));
  EXPECT_EQ(dims(weights->get("base_model.model.conv1.lokr_w2_a")), (std::vector<int64_t>{1, 4}));
  EXPECT_EQ(dims(weights->get("base_model.model.conv1.lokr_w2_b")), (std::vector<int64_t>{1, 3}));
  // conv2 [8, 8, 3, 3] at r 4: w2 whole, with the kernel.
  EXPECT_EQ(dims(weights->get("base_model.model.conv2.lokr_w2")), (std::vector<int64_t>{4, 4, 3, 3}));
  expect_offline_merge_refuses_a_5x5_conv1(dir, {"conv1.weight", "[8, 3, 5, 5]", "lokr_t2 [1, 1, 5, 5]",
                                                 "lokr_t2 [1, 1, 3, 3]"});
}
