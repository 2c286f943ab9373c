// IA3 on Conv2d: the layer against PEFT's formulas (written here as plain
// convolutions with scaled inputs or outputs), the merge of grouped, dilated
// and padded convolutions against a per-channel loop, training, files and the
// offline merge. Real PEFT's numbers are checked by tests/peft_reference
// (generate_conv.py's IA3 cases, both ways).
#include "conv_fixture.h"

#include <d9d/peft.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::HasSubstr;
using torch::nn::Conv2dOptions;
using namespace d9d_test;

namespace {

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

/// The convolutions the merge must handle: grouped, dilated, strided, and
/// every padding mode (scaling a channel commutes with padding it).
std::vector<Conv2dOptions> geometries() {
  return {
      Conv2dOptions(4, 6, 3).padding(1),
      Conv2dOptions(4, 6, 3).groups(2).stride(2),
      Conv2dOptions(6, 6, 3).groups(3).padding(2).dilation(2),
      Conv2dOptions(4, 8, 1).groups(4).bias(false),
      Conv2dOptions(4, 4, 3).padding(1).padding_mode(torch::kReflect),
      Conv2dOptions(4, 6, {3, 2}).padding(1).padding_mode(torch::kCircular).groups(2),
  };
}

/// The feed-forward merge written per output channel: filter `o` of group
/// `o / (out / groups)` reads input channels `group * in_per_group + j`.
at::Tensor ff_merged_by_loop(const at::Tensor& w, const at::Tensor& l, int64_t groups) {
  const int64_t out = w.size(0), in_per_group = w.size(1), out_per_group = out / groups;
  at::Tensor merged = w.clone();
  const at::Tensor flat = l.flatten();
  for (int64_t o = 0; o < out; ++o) {
    const int64_t group = o / out_per_group;
    for (int64_t j = 0; j < in_per_group; ++j) merged[o][j] *= flat[group * in_per_group + j];
  }
  return merged;
}

}  // namespace

TEST(IA3Conv2dLayer, OutputAndInputScalingAreThePeftFormulas) {
  torch::manual_seed(30);
  for (const auto& o : geometries()) {
    for (const bool ff : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "groups " << o.groups() << ", feedforward " << ff);
      d9d::nn::Conv2d base(o);
      const auto x = torch::randn({2, o.in_channels(), 7, 6});
      torch::NoGradGuard g;
      const auto plain = base->forward(x);
      peft::IA3Conv2dImpl layer(base.ptr(), peft::IA3Parameters().feedforward(ff).init_ones(false));
      ASSERT_EQ(layer.ia3_l.sizes(), (std::vector<int64_t>{1, ff ? o.in_channels() : o.out_channels(), 1, 1}));
      const auto want = ff ? base->forward_base(x * layer.ia3_l) : plain * layer.ia3_l;
      EXPECT_LE(max_diff(layer.forward(x), want), 1e-5);
    }
  }
}

TEST(IA3Conv2dLayer, FreshVectorsAreOnesAndLeaveTheOutputAlone) {
  torch::manual_seed(31);
  d9d::nn::Conv2d base(Conv2dOptions(3, 5, 3).padding(1));
  const auto x = torch::randn({2, 3, 6, 6});
  const auto plain = base->forward(x).detach();
  peft::IA3Conv2dImpl layer(base.ptr(), peft::IA3Parameters().feedforward(true));
  EXPECT_TRUE(torch::equal(layer.ia3_l, torch::ones({1, 3, 1, 1})));
  EXPECT_TRUE(torch::equal(layer.forward(x).detach(), plain));
}

TEST(IA3Conv2dLayer, MergeScalesTheRightChannelsAndRoundTrips) {
  torch::manual_seed(32);
  for (const auto& o : geometries()) {
    for (const bool ff : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "groups " << o.groups() << ", feedforward " << ff);
      d9d::nn::Conv2d base(o);
      const auto w = base->weight.detach().clone();
      const auto b = o.bias() ? base->bias.detach().clone() : at::Tensor();
      peft::IA3Conv2dImpl layer(base.ptr(), peft::IA3Parameters().feedforward(ff).init_ones(false));
      const auto x = torch::randn({2, o.in_channels(), 7, 6});
      torch::NoGradGuard g;
      const auto unmerged = layer.forward(x);
      const auto l = layer.ia3_l.detach();
      layer.merge_adapter("default");
      const auto want = ff ? ff_merged_by_loop(w, l, o.groups()) : w * l.reshape({-1, 1, 1, 1});
      EXPECT_LE(max_diff(base->weight, want), 1e-6);
      if (o.bias()) {
        EXPECT_TRUE(ff ? torch::equal(base->bias, b) : max_diff(base->bias, b * l.flatten()) <= 1e-6)
            << "the bias is scaled with the output only";
      }
      EXPECT_LE(max_diff(layer.forward(x), unmerged), 1e-5) << "merged forward is the adapter's";
      layer.unmerge_adapter("default");
      EXPECT_LE(max_diff(base->weight, w), 1e-5);
      EXPECT_LE(max_diff(layer.forward(x), unmerged), 1e-5);
    }
  }
}

TEST(IA3Conv2dLayer, SeveralActiveAdaptersMultiplyAndOthersAreRefused) {
  torch::manual_seed(33);
  d9d::nn::Conv2d base(Conv2dOptions(3, 4, 3));
  peft::IA3Conv2dImpl layer(base.ptr(), peft::IA3Parameters().init_ones(false), "a");
  layer.add_adapter("b", peft::IA3Parameters().init_ones(false));
  layer.set_active_adapters({"a", "b"});
  torch::NoGradGuard g;
  const auto x = torch::randn({2, 3, 5, 5});
  const auto want = base->forward_base(x) * layer.adapter("a").ia3_l * layer.adapter("b").ia3_l;
  EXPECT_LE(max_diff(layer.forward(x), want), 1e-5);
  EXPECT_EQ(layer.adapter("b").ia3_l.sizes(), (std::vector<int64_t>{1, 4, 1, 1}));
  EXPECT_THAT([&] { layer.add_adapter("c", peft::IA3Parameters().feedforward(true)); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("agrees on feedforward_modules")));
  EXPECT_THROW(layer.delta_weight("a"), peft::PeftError);
}

TEST(IA3Conv2dMethod, TrainingLowersTheLossChangesOnlyTheVectorsAndMerges) {
  convnet::ConvNet model = conv_base();
  torch::manual_seed(34);
  peft::hf::IA3Config config;
  config.target_modules.names = {"conv1", "conv2", "head"};
  config.feedforward_modules.names = {"conv2"};
  peft::IA3 ia3(config);
  peft::inject_peft_and_freeze(ia3, model);
  ASSERT_NE(model->named_modules()["conv1"]->as<peft::IA3Conv2dImpl>(), nullptr);
  EXPECT_TRUE(model->named_modules()["conv2"]->as<peft::IA3Conv2dImpl>()->feedforward());
  EXPECT_NE(model->named_modules()["head"]->as<peft::IA3LinearImpl>(), nullptr);
  ASSERT_EQ(peft::trainable_parameters(*model).size(), 3u);
  expect_conv_training_and_merge(model, ia3, "ia3_l", 5e-2);
}

TEST(IA3Conv2dFiles, SaveLoadAndOfflineMergeAgreeWithTheModel) {
  const auto x = conv_x();
  convnet::ConvNet model = conv_base();
  peft::hf::IA3Config config;
  config.target_modules.names = {"conv1", "conv2"};
  config.feedforward_modules.names = {"conv1"};
  config.init_ia3_weights = false;
  torch::manual_seed(35);
  peft::IA3 ia3(config);
  peft::inject_peft_and_freeze(ia3, model);
  TempDir dir;
  ms::save_safetensors(dir / "base.safetensors", ms::module_state_dict(*conv_base()));
  peft::hf::save_adapter(*model, dir / "adapter");
  const auto written = nlohmann::json::parse(read_bytes(dir / "adapter/adapter_config.json"));
  EXPECT_EQ(written["peft_type"], "IA3");
  EXPECT_EQ(written["feedforward_modules"], nlohmann::json::array({"conv1"}));
  const auto weights = ms::SafetensorsFile::open(dir / "adapter/adapter_model.safetensors");
  EXPECT_EQ(weights->get("base_model.model.conv1.ia3_l").sizes(), (std::vector<int64_t>{1, 3, 1, 1}));
  EXPECT_EQ(weights->get("base_model.model.conv2.ia3_l").sizes(), (std::vector<int64_t>{1, 8, 1, 1}));

  torch::NoGradGuard g;
  const auto logits = model->forward(x);
  convnet::ConvNet again = conv_base();
  auto loaded = peft::hf::load_adapter(*again, dir / "adapter");
  EXPECT_TRUE(torch::equal(again->forward(x), logits));

  peft::merge_peft(ia3, model);
  const auto merged = ms::module_state_dict(*model);
  peft::hf::merge_adapter_into_checkpoint(dir / "base.safetensors", dir / "adapter", dir / "offline", 1.0,
                                          ms::no_progress());
  const auto offline = ms::SafetensorsFile::open(dir / "offline/model.safetensors");
  for (const auto& key : offline->keys()) EXPECT_LE(max_diff(offline->get(key), merged.at(key)), 1e-7) << key;
  EXPECT_FALSE(torch::equal(offline->get("conv1.weight"), conv_base()->conv1->weight));
  EXPECT_TRUE(torch::equal(offline->get("conv1.bias"), conv_base()->conv1->bias)) << "feed-forward: bias untouched";
}

TEST(IA3Conv2dFiles, OfflineMergeInfersGroupsAndRefusesVectorsThatDoNotFit) {
  // A feed-forward vector on a grouped conv: [1, in, 1, 1] against a weight
  // [out, in / groups, kh, kw]; the checkpoint does not say the groups.
  struct GroupedImpl : torch::nn::Module {
    GroupedImpl() : conv(register_module("conv", d9d::nn::Conv2d(Conv2dOptions(6, 4, 3).groups(2)))) {}
    torch::Tensor forward(const torch::Tensor& x) { return conv(x); }
    d9d::nn::Conv2d conv;
  };
  torch::manual_seed(36);
  auto model = std::make_shared<GroupedImpl>();
  TempDir dir;
  ms::save_safetensors(dir / "base.safetensors", ms::module_state_dict(*model));
  peft::hf::IA3Config config;
  config.target_modules.names = {"conv"};
  config.feedforward_modules.names = {"conv"};
  config.init_ia3_weights = false;
  peft::IA3 ia3(config);
  peft::inject_peft_and_freeze(ia3, *model);
  peft::hf::save_adapter(*model, dir / "adapter");
  peft::merge_peft(ia3, *model);
  peft::hf::merge_adapter_into_checkpoint(dir / "base.safetensors", dir / "adapter", dir / "out", 1.0,
                                          ms::no_progress());
  EXPECT_LE(max_diff(ms::SafetensorsFile::open(dir / "out/model.safetensors")->get("conv.weight"), model->conv->weight),
            1e-7);

  // The same adapter against a base whose conv has 5 input channels per group.
  auto state = ms::module_state_dict(*model);
  state["conv.weight"] = torch::zeros({4, 5, 3, 3});
  ms::save_safetensors(dir / "other.safetensors", state);
  EXPECT_THAT(
      [&] {
        peft::hf::merge_adapter_into_checkpoint(dir / "other.safetensors", dir / "adapter", dir / "bad", 1.0,
                                                ms::no_progress());
      },
      ::testing::ThrowsMessage<d9d::Error>(::testing::AllOf(HasSubstr("conv.ia3_l"), HasSubstr("[4, 5, 3, 3]"),
                                                            HasSubstr("[1, in, 1, 1]"))));
  EXPECT_FALSE(fs::exists(dir / "bad/model.safetensors"));
}
