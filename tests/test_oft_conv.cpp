// OFT on Conv2d: on 1x1 kernels PEFT's forward (the input rotated per pixel,
// then the base), on larger kernels PEFT's merged model (each filter rotated,
// f·Rᵀ), both against the rotation written out from its formulas
// (oft_by_hand.h) and plain convolutions; several adapters in PEFT's order;
// merge and unmerge; training; files and the offline merge; the layers PEFT's
// oft.Conv2d cannot handle, refused. Real PEFT's numbers are checked by
// tests/peft_reference (generate_conv.py's OFT cases, both ways).
#include "conv_fixture.h"
#include "oft_by_hand.h"

#include <gtest/gtest.h>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using torch::nn::Conv2dOptions;
using namespace d9d_test;

namespace {

const auto& max_diff = conv_max_diff;
const auto& conv = plain_conv;

/// Exact Cayley (so `rotation_by_hand` is its formula), rotation drawn off the identity.
peft::OFTParameters drawn(int64_t block_size) {
  return peft::OFTParameters().r(0).oft_block_size(block_size).use_cayley_neumann(false).init_weights(false);
}

/// `x` `[B, C, H, W]` with each pixel's channel vector `v` replaced by `v·R`.
at::Tensor rotate_pixels(const at::Tensor& x, const at::Tensor& r) {
  return x.permute({0, 2, 3, 1}).matmul(r).permute({0, 3, 1, 2});
}

}  // namespace

TEST(OFTConv2dLayer, OneByOneKernelsRotateEachPixelBeforeTheBase) {
  torch::manual_seed(60);
  for (const auto& o : {Conv2dOptions(8, 6, 1), Conv2dOptions(8, 5, 1).stride(2).padding(1).bias(false)}) {
    d9d::nn::Conv2d base(o);
    peft::OFTConv2dImpl layer(base.ptr(), drawn(4));
    layer.eval();
    const auto& a = layer.adapter(peft::kDefaultAdapterName);
    EXPECT_EQ(a.blocks().r, 2);
    const auto r = rotation_by_hand(a);
    torch::NoGradGuard g;
    const auto x = torch::randn({2, 8, 6, 7});
    const auto want = conv(rotate_pixels(x, r), base->weight, base->bias, o);
    EXPECT_LE(max_diff(layer.forward(x), want), 1e-5);
    EXPECT_GT(max_diff(layer.forward(x), conv(x, base->weight, base->bias, o)), 1e-3);
  }
}

TEST(OFTConv2dLayer, LargerKernelsRotateEachFilterAndMergeToTheSame) {
  torch::manual_seed(61);
  const Conv2dOptions o = Conv2dOptions(4, 6, 3).stride(2).padding(1);
  d9d::nn::Conv2d base(o);
  const auto original = base->weight.detach().clone();
  peft::OFTConv2dImpl layer(base.ptr(), drawn(6));
  layer.eval();
  const auto& a = layer.adapter(peft::kDefaultAdapterName);
  EXPECT_EQ(a.blocks().r, 6) << "4·3·3 = 36 rotated features in blocks of 6";
  EXPECT_EQ(layer.oft_R->weight.sizes(), (std::vector<int64_t>{6, 15}));
  const auto r = rotation_by_hand(a);
  torch::NoGradGuard g;
  // Each filter flattened in the weight's order (channel, kernel row, column), times Rᵀ.
  const auto rotated = original.reshape({6, 36}).mm(r.t()).reshape({6, 4, 3, 3});
  const auto x = torch::randn({2, 4, 9, 8});
  const auto got = layer.forward(x);
  EXPECT_LE(max_diff(got, conv(x, rotated, base->bias, o)), 1e-5);
  layer.merge_adapter(peft::kDefaultAdapterName);
  EXPECT_LE(max_diff(base->weight, rotated), 1e-6);
  EXPECT_LE(max_diff(layer.forward(x), got), 1e-5);
  layer.unmerge_adapter(peft::kDefaultAdapterName);
  EXPECT_LE(max_diff(base->weight, original), 1e-5);
}

TEST(OFTConv2dLayer, TwoAdaptersRotateInPeftsOrder) {
  torch::manual_seed(62);
  const Conv2dOptions o = Conv2dOptions(6, 4, 1);
  d9d::nn::Conv2d base(o);
  peft::OFTConv2dImpl layer(base.ptr(), drawn(3), "a");
  layer.add_adapter("b", drawn(2));
  layer.set_active_adapters({"a", "b"});
  layer.eval();
  torch::NoGradGuard g;
  const auto x = torch::randn({2, 6, 5, 5});
  // PEFT: x ← x·R_a, then x ← x·R_b, then the base.
  const auto rotated = rotate_pixels(rotate_pixels(x, rotation_by_hand(layer.adapter("a"))),
                                     rotation_by_hand(layer.adapter("b")));
  EXPECT_LE(max_diff(layer.forward(x), conv(rotated, base->weight, base->bias, o)), 1e-5);
}

TEST(OFTConv2dMethod, TrainingLowersTheLossChangesOnlyTheRotationsAndMerges) {
  convnet::ConvNet model = conv_base();
  torch::manual_seed(63);
  peft::hf::OFTConfig config;
  config.target_modules.names = {"conv1", "conv2", "head"};
  config.oft_block_size = 9;  // conv1: 3·3·3 = 27 features, conv2: 8·3·3 = 72, head: 72
  peft::OFT oft(config);
  peft::inject_peft_and_freeze(oft, model);
  ASSERT_NE(model->named_modules()["conv1"]->as<peft::OFTConv2dImpl>(), nullptr);
  EXPECT_NE(model->named_modules()["head"]->as<peft::OFTLinearImpl>(), nullptr);
  ASSERT_EQ(peft::trainable_parameters(*model).size(), 3u);
  expect_conv_training_and_merge(model, oft, "oft_R", 1e-2);
}

TEST(OFTConv2dMethod, ConvsPeftCannotHandleAreRefusedBeforeAnyLayerChanges) {
  peft::hf::OFTConfig config;
  config.target_modules.names = {"head", "conv"};
  config.oft_block_size = 2;
  expect_conv_refused_before_any_layer_changes<peft::OFT>(config, Conv2dOptions(4, 4, 3).groups(2),
                                                          {"OFT: 'conv'", "groups = 2", "groups = 1 only"});
  expect_conv_refused_before_any_layer_changes<peft::OFT>(config, Conv2dOptions(4, 4, 3).dilation(2),
                                                          {"OFT: 'conv'", "dilation (2, 2)"});
  expect_conv_refused_before_any_layer_changes<peft::OFT>(config, Conv2dOptions(4, 4, {3, 1}),
                                                          {"OFT: 'conv'", "3x1 kernel", "not square"});
}

TEST(OFTConv2dFiles, SaveLoadAndOfflineMergeAgreeWithTheModel) {
  convnet::ConvNet model = conv_base();
  peft::hf::OFTConfig config;
  config.target_modules.names = {"conv1", "conv2"};
  config.oft_block_size = 9;
  config.coft = true;
  config.init_weights = false;
  torch::manual_seed(64);
  peft::OFT oft(config);
  peft::inject_peft_and_freeze(oft, model);
  TempDir dir;
  expect_files_round_trip(model, oft, dir);
  const auto weights = ms::SafetensorsFile::open(dir / "adapter/adapter_model.safetensors");
  EXPECT_EQ(weights->get("base_model.model.conv1.oft_R.weight").sizes(), (std::vector<int64_t>{3, 36}));
  EXPECT_EQ(weights->get("base_model.model.conv2.oft_R.weight").sizes(), (std::vector<int64_t>{8, 36}));
  expect_offline_merge_refuses_a_5x5_conv1(dir, {"conv1.oft_R.weight", "[3, 36]", "[8, 3, 5, 5]", "[15, 10]",
                                                 "75 rotated features"});
}
