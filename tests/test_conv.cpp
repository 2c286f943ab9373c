// Conv2d: d9d::nn::Conv2d against torch::nn::Conv2d, LoRA and DoRA on it
// against PEFT's formulas and PEFT's fixture (tests/fixtures/hf_peft/conv),
// training, the offline merge and the command line. Random PEFT configs both
// ways are in tests/peft_reference (generate_conv.py, conv_tool.cpp).
#include "conv_fixture.h"

#include <d9d/peft.h>

#include <torch/nn/functional/conv.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/adamw.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <map>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::HasSubstr;
using namespace d9d_test;

namespace {

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

/// PEFT's conv ΔW written as a product of the flattened factors (an
/// independent route to PEFT's conv2d(A^T, B)^T): `scale * B[out, r] @ A[r, in*kh*kw]`.
at::Tensor flat_delta(const at::Tensor& a, const at::Tensor& b, double scale) {
  const int64_t r = a.size(0);
  return b.reshape({-1, r}).mm(a.reshape({r, -1})).reshape({b.size(0), a.size(1), a.size(2), a.size(3)}) * scale;
}

/// A plain convolution with the geometry of `layer` and the given weights.
at::Tensor conv_with(const d9d::nn::Conv2dImpl& layer, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const auto& o = layer.options;
  return torch::nn::functional::detail::conv2d(x, w, b, o.stride(), o.padding(), o.dilation(), o.groups());
}

}  // namespace

TEST(Conv2dDropIn, SameInitialisationAndBitIdenticalForwardAsTorchConv2d) {
  using torch::nn::Conv2dOptions;
  const std::vector<Conv2dOptions> cases = {
      Conv2dOptions(3, 8, 3).padding(1),
      Conv2dOptions(8, 8, 3).stride(2),
      Conv2dOptions(4, 6, {3, 1}).stride({2, 1}).padding({1, 0}).bias(false),
      Conv2dOptions(4, 4, 3).dilation(2).groups(2),
      Conv2dOptions(3, 5, 3).padding(torch::kSame),
      Conv2dOptions(3, 5, 3).padding(torch::kValid),
      Conv2dOptions(3, 5, 3).padding(1).padding_mode(torch::kReflect),
      Conv2dOptions(3, 5, 3).padding(2).padding_mode(torch::kCircular),
      Conv2dOptions(3, 5, 3).padding(1).padding_mode(torch::kReplicate),
      Conv2dOptions(3, 5, 3).padding(torch::kSame).padding_mode(torch::kReflect),
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    torch::manual_seed(static_cast<uint64_t>(i));
    torch::nn::Conv2d theirs(cases[i]);
    torch::manual_seed(static_cast<uint64_t>(i));
    d9d::nn::Conv2d ours(cases[i]);
    ASSERT_TRUE(torch::equal(ours->weight, theirs->weight)) << "case " << i;
    ASSERT_EQ(ours->bias.defined(), theirs->bias.defined()) << "case " << i;
    if (ours->bias.defined()) EXPECT_TRUE(torch::equal(ours->bias, theirs->bias)) << "case " << i;
    const auto x = torch::randn({2, cases[i].in_channels(), 9, 7});
    torch::NoGradGuard g;
    EXPECT_TRUE(torch::equal(ours->forward(x), theirs->forward(x))) << "case " << i << ": " << *ours;
  }
}

TEST(Conv2dDropIn, TorchCheckpointLoadsAndGivesPeftsBaseLogits) {
  torch::manual_seed(3);
  convnet::TorchConvNet theirs;
  TempDir dir;
  ms::save_safetensors(dir / "torch.safetensors", ms::module_state_dict(*theirs));
  convnet::ConvNet ours;
  ms::load_model_state(dir / "torch.safetensors", *ms::identity_mapper_from_module(*ours), *ours, quiet());
  torch::NoGradGuard g;
  const auto x = torch::randn({3, 3, 8, 8});
  EXPECT_TRUE(torch::equal(ours->forward(x), theirs->forward(x)));
  // PEFT's fixture: its base logits came from torch.nn.Conv2d in Python.
  const auto logits = ms::SafetensorsFile::open(kConv + "/inputs.safetensors")->get("logits");
  EXPECT_LE(max_diff(conv_base()->forward(conv_x()), logits), 1e-5);
}

TEST(Conv2dDropIn, BadOptionsNameTheField) {
  EXPECT_THAT([] { d9d::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).groups(2)); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("groups")));
  EXPECT_THAT([] { d9d::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).stride(2).padding(torch::kSame)); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("strided")));
  EXPECT_THAT([] { d9d::nn::Conv2d(torch::nn::Conv2dOptions(0, 8, 3)); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("in_channels")));
}

TEST(LoRAConv2dLayer, PeftsLayoutForwardDeltaMergeAndUnmerge) {
  for (const bool one_by_one : {false, true}) {
    torch::manual_seed(one_by_one ? 11 : 10);
    d9d::nn::Conv2d base(one_by_one ? torch::nn::Conv2dOptions(4, 6, 1).stride(2)
                                    : torch::nn::Conv2dOptions(4, 6, {3, 2}).stride({2, 1}).padding({1, 2}));
    const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
    peft::LoRAConv2dImpl layer(base.ptr(), peft::LoRAParameters().r(3).alpha(5).init(peft::LoRAInit::Random));
    const auto& k = *base->options.kernel_size();
    EXPECT_EQ(layer.lora_A->weight.sizes(), (std::vector<int64_t>{3, 4, k[0], k[1]}));
    EXPECT_EQ(layer.lora_B->weight.sizes(), (std::vector<int64_t>{6, 3, 1, 1}));
    std::vector<std::string> keys;
    for (const auto& p : layer.named_parameters()) keys.push_back(p.key());
    EXPECT_EQ(keys, (std::vector<std::string>{"base.weight", "base.bias", "lora_A.weight", "lora_B.weight"}));

    torch::NoGradGuard g;
    const auto x = torch::randn({2, 4, 7, 9});
    const double s = 5.0 / 3.0;
    const auto A = layer.lora_A->weight, B = layer.lora_B->weight;
    // PEFT: base(x) + lora_B(lora_A(x)) * scale, lora_A with the base's stride and padding.
    const auto low = at::conv2d(conv_with(*base, x, A, at::Tensor()), B);
    const auto expected = conv_with(*base, x, w, b) + low * s;
    EXPECT_LE(max_diff(layer.forward(x), expected), 1e-5) << "without grad: one convolution with W + ΔW";
    {
      torch::AutoGradMode grad(true);
      EXPECT_LE(max_diff(layer.forward(x).detach(), expected), 1e-5) << "with grad: the base plus lora_B(lora_A(x))";
    }
    EXPECT_LE(max_diff(layer.delta_weight("default"), flat_delta(A, B, s)), 1e-6);
    layer.merge_adapter("default");
    EXPECT_LE(max_diff(base->weight, w + flat_delta(A, B, s)), 1e-6);
    EXPECT_LE(max_diff(layer.forward(x), expected), 1e-5) << "merged equals unmerged";
    layer.unmerge_adapter("default");
    EXPECT_LE(max_diff(base->weight, w), 1e-6);
  }
}

TEST(LoRAConv2dLayer, PeftsDefaultInitIsANoOpAndRsLoraScales) {
  torch::manual_seed(12);
  d9d::nn::Conv2d base(torch::nn::Conv2dOptions(3, 5, 3).padding(1));
  peft::LoRAConv2dImpl layer(base.ptr(), peft::LoRAParameters().r(4).alpha(6).use_rslora(true));
  EXPECT_TRUE(layer.lora_B->weight.eq(0).all().item<bool>());
  EXPECT_GT(layer.lora_A->weight.abs().max().item<double>(), 0.0);
  EXPECT_DOUBLE_EQ(layer.scale(), 6.0 / 2.0);
  torch::NoGradGuard g;
  const auto x = torch::randn({1, 3, 5, 5});
  EXPECT_TRUE(torch::equal(layer.forward(x), base->forward_base(x)));
}

TEST(LoRAConv2dLayer, DoraIsTheMagnitudeRescaledMergedConvolution) {
  torch::manual_seed(13);
  d9d::nn::Conv2d base(torch::nn::Conv2dOptions(4, 6, 3).stride(2).padding(1));
  const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
  peft::LoRAConv2dImpl layer(base.ptr(),
                             peft::LoRAParameters().r(2).alpha(3).use_dora(true).init(peft::LoRAInit::Random));
  ASSERT_EQ(layer.lora_magnitude_vector.sizes(), (std::vector<int64_t>{1, 6, 1, 1})) << "PEFT's shape";
  torch::NoGradGuard g;
  const auto A = layer.lora_A->weight, B = layer.lora_B->weight;
  const auto sum = w + flat_delta(A, B, 1.5);
  const auto norm = sum.reshape({6, -1}).norm(2, {1});
  EXPECT_LE(max_diff(layer.lora_magnitude_vector.reshape({-1}), norm), 1e-5) << "initialised to ||W + s dW||";
  layer.lora_magnitude_vector.mul_(torch::linspace(0.5, 1.5, 6).view({1, 6, 1, 1}));
  const auto m = layer.lora_magnitude_vector.reshape({-1});
  const auto merged = sum * (m / norm).view({-1, 1, 1, 1});
  const auto x = torch::randn({2, 4, 8, 8});
  const auto expected = conv_with(*base, x, merged, b);
  EXPECT_LE(max_diff(layer.forward(x), expected), 1e-5);
  EXPECT_THAT([&] { layer.delta_weight("default"); }, ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("DoRA")));
  layer.merge_adapter("default");
  EXPECT_LE(max_diff(base->weight, merged), 1e-5);
  EXPECT_LE(max_diff(layer.forward(x), expected), 1e-5);
  layer.unmerge_adapter("default");
  EXPECT_LE(max_diff(base->weight, w), 1e-5);
}

TEST(LoRAConv2dFiles, PeftsFixturesGiveLogitsMergedWeightsOfflineAndCliMerges) {
  const auto x = conv_x();
  const std::string cli = D9D_PEFT_CLI;
  for (const std::string name : {"lora_conv_r4", "dora_conv_r2"}) {
    SCOPED_TRACE(name);
    const std::string dir = kConv + "/adapters/" + name;
    const auto expected = ms::SafetensorsFile::open(dir + "/expected.safetensors");
    convnet::ConvNet model = conv_base();
    auto method = peft::hf::load_adapter(*model, dir);
    ASSERT_NE(model->named_modules()["conv1"]->as<peft::LoRAConv2dImpl>(), nullptr);
    torch::NoGradGuard g;
    EXPECT_GT(max_diff(expected->get("logits"), conv_base()->forward(x)), 1e-3) << "the adapter changes the logits";
    EXPECT_LE(max_diff(model->forward(x), expected->get("logits")), 1e-5);
    peft::merge_peft(*method, model);
    EXPECT_NE(model->named_modules()["conv1"]->as<d9d::nn::Conv2dImpl>(), nullptr) << "unwrapped";
    EXPECT_FALSE(model->conv1->has_override());
    EXPECT_LE(max_diff(model->forward(x), expected->get("merged_logits")), 1e-5);

    TempDir out;
    peft::hf::merge_adapter_into_checkpoint(kConv + "/model.safetensors", dir, out / "lib", 1.0, ms::no_progress());
    ASSERT_EQ(std::system(("'" + cli + "' merge --base '" + kConv + "/model.safetensors' --adapter '" + dir +
                           "' --out '" + (out / "cli") + "' > '" + (out / "merge.log") + "' 2>&1")
                              .c_str()),
              0)
        << read_bytes(out / "merge.log");
    const auto state = ms::module_state_dict(*model);
    const auto offline = ms::SafetensorsFile::open(out / "lib/model.safetensors");
    const auto by_cli = ms::SafetensorsFile::open(out / "cli/model.safetensors");
    size_t merged = 0;
    for (const auto& key : expected->keys()) {
      if (key.rfind("merged.", 0) != 0) continue;
      ++merged;
      const std::string weight = key.substr(7);
      EXPECT_LE(max_diff(state.at(weight), expected->get(key)), 1e-5) << weight;
      EXPECT_LE(max_diff(offline->get(weight), expected->get(key)), 1e-5) << "library offline " << weight;
      EXPECT_LE(max_diff(by_cli->get(weight), expected->get(key)), 1e-5) << "cli " << weight;
    }
    EXPECT_GE(merged, 2u);
    convnet::ConvNet from_file;
    ms::load_model_state(out / "cli/model.safetensors", *ms::identity_mapper_from_module(*from_file), *from_file,
                         quiet());
    EXPECT_LE(max_diff(from_file->forward(x), expected->get("merged_logits")), 1e-5);

    ASSERT_EQ(std::system(("'" + cli + "' inspect '" + dir + "' > '" + (out / "inspect.log") + "' 2>&1").c_str()), 0);
    const std::string shown = read_bytes(out / "inspect.log");
    EXPECT_THAT(shown, HasSubstr("base_model.model.conv2.lora_A.weight"));
    EXPECT_THAT(shown, ::testing::ContainsRegex(name == "lora_conv_r4" ? "conv1 +conv " : "conv1 +dora conv "));
  }
}

TEST(LoRAConv2dFiles, SaveLoadRoundTripAndTwoAdaptersSwitch) {
  const auto x = conv_x();
  convnet::ConvNet model = conv_base();
  auto a = peft::hf::load_adapter(*model, kConv + "/adapters/lora_conv_r4", "lora");
  auto b = peft::hf::load_adapter(*model, kConv + "/adapters/dora_conv_r2", "dora");
  torch::NoGradGuard g;
  const auto lora_logits = ms::SafetensorsFile::open(kConv + "/adapters/lora_conv_r4/expected.safetensors")->get("logits");
  const auto dora_logits = ms::SafetensorsFile::open(kConv + "/adapters/dora_conv_r2/expected.safetensors")->get("logits");
  EXPECT_LE(max_diff(model->forward(x), lora_logits), 1e-5) << "the first adapter stays active";
  peft::set_adapter(*model, "dora");
  EXPECT_LE(max_diff(model->forward(x), dora_logits), 1e-5);

  TempDir dir;
  peft::hf::SaveAdapterOptions options;
  options.adapter_name = "dora";
  peft::hf::save_adapter(*model, dir.str(), options);
  const auto written = nlohmann::json::parse(read_bytes(dir / "adapter_config.json"));
  EXPECT_EQ(written["use_dora"], true);
  EXPECT_EQ(written["r"], 2);
  const auto weights = ms::SafetensorsFile::open(dir / "adapter_model.safetensors");
  const auto original = ms::SafetensorsFile::open(kConv + "/adapters/dora_conv_r2/adapter_model.safetensors");
  EXPECT_EQ(weights->keys(), original->keys());
  for (const auto& key : original->keys()) EXPECT_TRUE(torch::equal(weights->get(key), original->get(key))) << key;
  convnet::ConvNet again = conv_base();
  peft::hf::load_adapter(*again, dir.str());
  EXPECT_LE(max_diff(again->forward(x), dora_logits), 1e-6);
}

TEST(LoRAConv2dMethod, TrainingLowersTheLossAndChangesOnlyAdapterTensors) {
  for (const bool dora : {false, true}) {
    SCOPED_TRACE(dora ? "DoRA" : "LoRA");
    convnet::ConvNet model = conv_base();
    torch::manual_seed(21);
    peft::LoRA lora({"conv1|conv2|head", peft::LoRAParameters().r(4).alpha(8).dropout(0.1).use_dora(dora)});
    peft::inject_peft_and_freeze(lora, model);
    EXPECT_EQ(peft::trainable_parameters(*model).size(), dora ? 9u : 6u);
    expect_conv_training_and_merge(model, lora, ".lora_", 1e-2);
  }
}

namespace {

struct OddConvImpl : torch::nn::Module {
  explicit OddConvImpl(torch::nn::Conv2dOptions o) : conv(register_module("conv", d9d::nn::Conv2d(o))) {}
  torch::Tensor forward(const torch::Tensor& x) { return conv(x); }
  d9d::nn::Conv2d conv;
};
TORCH_MODULE(OddConv);

}  // namespace

TEST(LoRAConv2dMethod, RefusalsNameTheLayerAndLeaveTheModel) {
  using torch::nn::Conv2dOptions;
  const std::vector<std::pair<Conv2dOptions, std::string>> cases = {
      {Conv2dOptions(4, 4, 3).groups(2), "groups = 2"},
      {Conv2dOptions(4, 4, 3).padding(1).padding_mode(torch::kReflect), "padding_mode kReflect"},
      {Conv2dOptions(4, 4, 3).dilation(2), "dilation (2, 2)"},
  };
  for (const auto& [options, text] : cases) {
    OddConv model(options);
    const auto w = model->conv->weight.clone();
    peft::LoRA lora({"conv", peft::LoRAParameters().r(2)});
    EXPECT_THAT([&] { peft::inject_peft_and_freeze(lora, model); },
                ::testing::ThrowsMessage<peft::PeftError>(::testing::AllOf(HasSubstr("'conv'"), HasSubstr(text))));
    EXPECT_NE(model->named_modules()["conv"]->as<d9d::nn::Conv2dImpl>(), nullptr);
    EXPECT_FALSE(model->conv->has_override());
    EXPECT_TRUE(torch::equal(model->conv->weight, w));
    EXPECT_TRUE(model->conv->weight.requires_grad());
  }
  // A 1x1 kernel ignores dilation, so PEFT's lora_A lines up with it.
  OddConv pointwise(Conv2dOptions(4, 4, 1).dilation(2));
  peft::LoRA lora({"conv", peft::LoRAParameters().r(2)});
  EXPECT_NO_THROW(peft::inject_peft_and_freeze(lora, pointwise));

  convnet::TorchConvNet plain;
  peft::LoRA on_torch({"conv1", peft::LoRAParameters().r(2)});
  EXPECT_THAT([&] { peft::inject_peft_and_freeze(on_torch, plain); },
              ::testing::ThrowsMessage<peft::PeftError>(
                  ::testing::AllOf(HasSubstr("'conv1'"), HasSubstr("torch::nn::Conv2d"), HasSubstr("d9d::nn"))));
}

namespace {

struct LinearThenConvImpl : torch::nn::Module {
  LinearThenConvImpl()
      : lin(register_module("lin", d9d::nn::Linear(4, 4))), conv(register_module("conv", d9d::nn::Conv2d(4, 4, 3))) {}
  d9d::nn::Linear lin;
  d9d::nn::Conv2d conv;
};
TORCH_MODULE(LinearThenConv);

}  // namespace

TEST(LoRAConv2dMethod, PissaOnAConvLayerIsRefusedBeforeAnyLayerChanges) {
  // conv already holds a LoRA adapter; a PiSSA adapter over lin and conv must
  // be refused while selecting, before lin's weight becomes a residual.
  LinearThenConv model;
  peft::hf::LoraConfig plain;
  plain.r = 2;
  plain.target_modules.names = {"conv"};
  peft::hf::add_adapter(*model, "default", plain);
  const auto w = model->lin->weight.clone();
  peft::hf::LoraConfig pissa = plain;
  pissa.target_modules.names = {"lin", "conv"};
  pissa.init = peft::LoRAInit::PiSSA;
  EXPECT_THAT([&] { peft::hf::add_adapter(*model, "p", pissa); },
              ::testing::ThrowsMessage<peft::PeftError>(::testing::AllOf(HasSubstr("'conv'"), HasSubstr("pissa"))));
  EXPECT_TRUE(torch::equal(model->lin->weight, w));
  EXPECT_FALSE(model->lin->has_override());
  const auto* conv = model->named_modules()["conv"]->as<peft::LoRAConv2dImpl>();
  ASSERT_NE(conv, nullptr);
  EXPECT_EQ(conv->adapter_names(), std::vector<std::string>{"default"});
}

namespace {

struct TwoConvImpl : torch::nn::Module {
  TwoConvImpl()
      : a(register_module("a", d9d::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 3).padding(1)))),
        b(register_module("b", d9d::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 3).padding(1).groups(2)))) {}
  torch::Tensor forward(const torch::Tensor& x) { return b(a(x)); }
  d9d::nn::Conv2d a, b;
};
TORCH_MODULE(TwoConv);

}  // namespace

TEST(LoRAConv2dMethod, AFailedStackRollsBackTheConvLayerItWrapped) {
  TwoConv model;
  const auto x = torch::randn({1, 4, 5, 5});
  torch::NoGradGuard g;
  const auto before = model->forward(x);
  std::vector<std::unique_ptr<peft::PeftMethodBase>> methods;
  methods.push_back(std::make_unique<peft::LoRA>(
      peft::LoRAConfig{"a", peft::LoRAParameters().r(2).init(peft::LoRAInit::Random)}));
  methods.push_back(std::make_unique<peft::LoRA>(peft::LoRAConfig{"b", peft::LoRAParameters().r(2)}));
  peft::PeftStack stack(std::move(methods));
  EXPECT_THAT([&] { peft::inject_peft_and_freeze(stack, model); },
              ::testing::ThrowsMessage<peft::PeftError>(::testing::AllOf(HasSubstr("'b'"), HasSubstr("groups = 2"))));
  EXPECT_NE(model->named_modules()["a"]->as<d9d::nn::Conv2dImpl>(), nullptr) << "the first LoRA was taken out";
  EXPECT_FALSE(model->a->has_override());
  for (const auto& p : model->named_parameters()) {
    EXPECT_TRUE(p.value().requires_grad()) << p.key();
    EXPECT_EQ(p.key().find("lora"), std::string::npos) << p.key();
  }
  EXPECT_TRUE(torch::equal(model->forward(x), before));
}

TEST(LoRAConv2dMethod, MergeRefusesNaNAndLeavesTheModel) {
  convnet::ConvNet model = conv_base();
  peft::LoRA lora({"conv2", peft::LoRAParameters().r(2).init(peft::LoRAInit::Random)});
  peft::inject_peft_and_freeze(lora, model);
  auto* conv2 = model->named_modules()["conv2"]->as<peft::LoRAConv2dImpl>();
  ASSERT_NE(conv2, nullptr);
  const auto w = conv2->base->weight.clone();
  {
    torch::NoGradGuard g;
    conv2->lora_A->weight[0][0][0][0] = NAN;
  }
  EXPECT_THAT([&] { peft::merge_peft(lora, model); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("NaN or Inf")));
  EXPECT_TRUE(torch::equal(conv2->base->weight, w));
  EXPECT_NE(model->named_modules()["conv2"]->as<peft::LoRAConv2dImpl>(), nullptr);
}

TEST(LoRAConv2dFiles, OfflineMergeRefusesMismatchedShapesByName) {
  TempDir dir;
  // conv1's adapter against a base whose conv1 has another kernel.
  convnet::ConvNet model = conv_base();
  auto state = ms::module_state_dict(*model);
  state["conv1.weight"] = torch::zeros({8, 3, 5, 5});
  ms::save_safetensors(dir / "base.safetensors", state);
  EXPECT_THAT(
      [&] {
        peft::hf::merge_adapter_into_checkpoint(dir / "base.safetensors", kConv + "/adapters/dora_conv_r2",
                                                dir / "out", 1.0, ms::no_progress());
      },
      ::testing::ThrowsMessage<d9d::Error>(::testing::AllOf(HasSubstr("conv1.weight"), HasSubstr("[8, 3, 3, 3]"))));
  EXPECT_FALSE(fs::exists(dir / "out/model.safetensors"));
}
