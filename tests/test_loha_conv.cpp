// LoHa on Conv2d: the layer against PEFT's formulas (the delta rebuilt here
// with matrix products, the CP form without einsum, the forward as two plain
// convolutions), merging, rank dropout in training, training, files and the
// offline merge, and the refusal of a padding mode PEFT cannot merge. Real
// PEFT's numbers are checked by tests/peft_reference (generate_conv.py's LoHa
// cases, both ways).
#include "conv_fixture.h"

#include <d9d/peft.h>

#include <torch/nn/functional/conv.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/adamw.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::HasSubstr;
using torch::nn::Conv2dOptions;
using namespace d9d_test;

namespace {

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

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

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const Conv2dOptions& o) {
  auto f = torch::nn::functional::Conv2dFuncOptions().stride(o.stride()).padding(o.padding()).dilation(o.dilation()).groups(
      o.groups());
  if (b.defined()) f.bias(b);
  return torch::nn::functional::conv2d(x, w, f);
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
    const auto original = base->weight.detach().clone();
    peft::LoHaConv2dImpl layer(base.ptr(), drawn(cp).rank_dropout(0.5));
    layer.eval();
    const auto x = torch::randn({2, 4, 7, 7});
    torch::NoGradGuard g;
    const auto unmerged = layer.forward(x);
    layer.merge_adapter(peft::kDefaultAdapterName);
    EXPECT_LE(max_diff(layer.forward(x), unmerged), 1e-5);
    EXPECT_LE(max_diff(conv(x, base->weight, base->bias, o), unmerged), 1e-5);
    layer.unmerge_adapter(peft::kDefaultAdapterName);
    EXPECT_LE(max_diff(base->weight, original), 1e-6);

    // PEFT in training: torch.rand(1) for module dropout, then torch.rand(out)
    // rows of ΔW kept (> p), divided by the kept fraction.
    layer.train();
    torch::manual_seed(7);
    const auto got = layer.forward(x);
    torch::manual_seed(7);
    at::rand({1});
    at::Tensor keep = (at::rand({6}) > 0.5).to(at::kFloat);
    keep = keep / keep.mean();
    const auto delta = expected_delta(layer.adapter(peft::kDefaultAdapterName), base->weight.sizes()) *
                       keep.view({-1, 1, 1, 1});
    EXPECT_LE(max_diff(got, conv(x, base->weight, base->bias, o) + conv(x, delta, at::Tensor(), o)), 1e-5);
  }
}

TEST(LoHaConv2dMethod, TrainingLowersTheLossChangesOnlyTheFactorsAndMerges) {
  convnet::ConvNet model = conv_base();
  torch::manual_seed(42);
  const auto x = torch::randn({8, 3, 8, 8});
  const auto target = torch::randint(0, 5, {8});
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
  std::map<std::string, at::Tensor> before;
  for (const auto& p : model->named_parameters()) before[p.key()] = p.value().detach().clone();
  const auto trainable = peft::trainable_parameters(*model);
  ASSERT_EQ(trainable.size(), 6u + 6u + 4u);
  auto loss_of = [&] { return torch::nn::functional::cross_entropy(model->forward(x), target); };
  const double first = loss_of().item<double>();
  torch::optim::AdamW opt(trainable, torch::optim::AdamWOptions(1e-2));
  model->train();
  for (int step = 0; step < 10; ++step) {
    opt.zero_grad();
    loss_of().backward();
    opt.step();
  }
  model->eval();
  torch::NoGradGuard g;
  EXPECT_LT(loss_of().item<double>(), first - 1e-3);
  for (const auto& p : model->named_parameters()) {
    const bool factor = p.key().find("hada_") != std::string::npos;
    EXPECT_EQ(!torch::equal(p.value(), before.at(p.key())), factor) << p.key();
  }
  const auto unmerged = model->forward(x);
  peft::merge_peft(loha, model);
  EXPECT_NE(model->named_modules()["conv1"]->as<d9d::nn::Conv2dImpl>(), nullptr);
  EXPECT_NE(model->named_modules()["conv2"]->as<d9d::nn::Conv2dImpl>(), nullptr);
  EXPECT_LE(max_diff(model->forward(x), unmerged), 1e-5);
}

TEST(LoHaConv2dMethod, AReflectPaddedConvIsRefusedBeforeAnyLayerChanges) {
  struct NetImpl : torch::nn::Module {
    NetImpl()
        : conv(register_module("conv", d9d::nn::Conv2d(Conv2dOptions(3, 4, 3).padding(1).padding_mode(torch::kReflect)))),
          head(register_module("head", d9d::nn::Linear(4, 2))) {}
    d9d::nn::Conv2d conv;
    d9d::nn::Linear head;
  };
  auto net = std::make_shared<NetImpl>();
  peft::hf::LoHaConfig config;
  config.target_modules.names = {"head", "conv"};
  peft::LoHa loha(config);
  EXPECT_THAT([&] { peft::inject_peft_and_freeze(loha, *net); },
              ::testing::ThrowsMessage<peft::PeftError>(
                  ::testing::AllOf(HasSubstr("'conv'"), HasSubstr("padding_mode kReflect"), HasSubstr("zeros"))));
  EXPECT_NE(net->named_modules()["head"]->as<d9d::nn::LinearImpl>(), nullptr);
  EXPECT_NE(net->named_modules()["conv"]->as<d9d::nn::Conv2dImpl>(), nullptr);
  EXPECT_TRUE(peft::trainable_parameters(*net).size() == net->parameters().size()) << "nothing frozen";
}

TEST(LoHaConv2dFiles, SaveLoadAndOfflineMergeAgreeWithTheModel) {
  const auto x = conv_x();
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
  ms::save_safetensors(dir / "base.safetensors", ms::module_state_dict(*conv_base()));
  peft::hf::save_adapter(*model, dir / "adapter");
  const auto written = nlohmann::json::parse(read_bytes(dir / "adapter/adapter_config.json"));
  EXPECT_EQ(written["peft_type"], "LOHA");
  EXPECT_EQ(written["use_effective_conv2d"], true);
  const auto weights = ms::SafetensorsFile::open(dir / "adapter/adapter_model.safetensors");
  EXPECT_EQ(weights->get("base_model.model.conv1.hada_t1").sizes(), (std::vector<int64_t>{3, 3, 3, 3}));
  EXPECT_EQ(weights->get("base_model.model.conv2.hada_t2").sizes(), (std::vector<int64_t>{2, 2, 3, 3}));
  EXPECT_EQ(weights->get("base_model.model.conv2.hada_w1_a").sizes(), (std::vector<int64_t>{2, 8}));
  EXPECT_EQ(weights->get("base_model.model.conv1.hada_w2_b").sizes(), (std::vector<int64_t>{3, 3}));

  torch::NoGradGuard g;
  const auto logits = model->forward(x);
  convnet::ConvNet again = conv_base();
  peft::hf::load_adapter(*again, dir / "adapter");
  EXPECT_TRUE(torch::equal(again->forward(x), logits));

  peft::merge_peft(loha, model);
  const auto merged = ms::module_state_dict(*model);
  peft::hf::merge_adapter_into_checkpoint(dir / "base.safetensors", dir / "adapter", dir / "offline", 1.0,
                                          ms::no_progress());
  const auto offline = ms::SafetensorsFile::open(dir / "offline/model.safetensors");
  for (const auto& key : offline->keys()) EXPECT_LE(max_diff(offline->get(key), merged.at(key)), 1e-6) << key;
  EXPECT_FALSE(torch::equal(offline->get("conv1.weight"), conv_base()->conv1->weight));

  // The same adapter against a base whose conv1 has a 5x5 kernel.
  auto state = ms::module_state_dict(*conv_base());
  state["conv1.weight"] = torch::zeros({8, 3, 5, 5});
  ms::save_safetensors(dir / "other.safetensors", state);
  EXPECT_THAT(
      [&] {
        peft::hf::merge_adapter_into_checkpoint(dir / "other.safetensors", dir / "adapter", dir / "bad", 1.0,
                                                ms::no_progress());
      },
      ::testing::ThrowsMessage<d9d::Error>(::testing::AllOf(HasSubstr("conv1.weight"), HasSubstr("[8, 3, 5, 5]"),
                                                            HasSubstr("hada_t1 [3, 3, 3, 3]"), HasSubstr("CP form"))));
  EXPECT_FALSE(fs::exists(dir / "bad/model.safetensors"));
}
