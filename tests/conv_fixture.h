#pragma once
// PEFT's conv fixture (tests/fixtures/hf_peft/conv) for the unit tests: its
// directory, the twin net with its base weights, and its input; and the
// checks every method's Conv2d tests share.
#include "conv_model.h"
#include "test_util.h"
#include "training_check.h"

#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>
#include <d9d/peft.h>

#include <torch/nn/functional/conv.h>
#include <torch/nn/functional/loss.h>

#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace d9d_test {

inline const std::string kConv = std::string(D9D_FIXTURES_DIR) + "/hf_peft/conv";

/// The fixture's net with its base weights, in eval mode.
inline convnet::ConvNet conv_base() {
  convnet::ConvNet model;
  namespace ms = d9d::model_state;
  ms::load_model_state(kConv + "/model.safetensors", *ms::identity_mapper_from_module(*model), *model, quiet());
  model->eval();
  return model;
}

/// The fixture's input `x` `[B, 3, 8, 8]`.
inline at::Tensor conv_x() {
  return d9d::model_state::SafetensorsFile::open(kConv + "/inputs.safetensors")->get("x");
}

inline double conv_max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

/// The plain convolution of `x` with `w` and `b` (undefined: none) and the geometry of `o`.
inline at::Tensor plain_conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                             const torch::nn::Conv2dOptions& o) {
  auto f = torch::nn::functional::Conv2dFuncOptions().stride(o.stride()).padding(o.padding()).dilation(o.dilation()).groups(
      o.groups());
  if (b.defined()) f.bias(b);
  return torch::nn::functional::conv2d(x, w, f);
}

/// A layer adding `conv(x, ΔW)` (LoHa, LoKr) with rank dropout 0.5: merged
/// equals unmerged and the plain conv of the merged weight, unmerging puts
/// the weight back, and in training the output is PEFT's (one rand(1) for
/// module dropout, then rand(out) output channels kept, divided by the kept
/// fraction). `expected_delta()` is ΔW written in the test.
template <typename Layer, typename ExpectedDelta>
void expect_merge_and_rank_dropout(Layer& layer, const d9d::nn::Conv2d& base, const torch::nn::Conv2dOptions& o,
                                   ExpectedDelta expected_delta) {
  const auto original = base->weight.detach().clone();
  layer.eval();
  const auto x = torch::randn({2, o.in_channels(), 7, 7});
  torch::NoGradGuard g;
  const auto unmerged = layer.forward(x);
  layer.merge_adapter(d9d::peft::kDefaultAdapterName);
  EXPECT_LE(conv_max_diff(layer.forward(x), unmerged), 1e-5);
  EXPECT_LE(conv_max_diff(plain_conv(x, base->weight, base->bias, o), unmerged), 1e-5);
  layer.unmerge_adapter(d9d::peft::kDefaultAdapterName);
  EXPECT_LE(conv_max_diff(base->weight, original), 1e-6);

  layer.train();
  torch::manual_seed(7);
  const auto got = layer.forward(x);
  torch::manual_seed(7);
  at::rand({1});
  at::Tensor keep = (at::rand({o.out_channels()}) > 0.5).to(at::kFloat);
  keep = keep / keep.mean();
  const auto delta = expected_delta() * keep.view({-1, 1, 1, 1});
  EXPECT_LE(conv_max_diff(got, plain_conv(x, base->weight, base->bias, o) + plain_conv(x, delta, at::Tensor(), o)),
            1e-5);
}

/// Ten AdamW steps on the fixture's net, adapted by `method` (already
/// injected): `expect_training_changes_only` with the parameters whose key
/// contains `adapter_key`, and after `merge_peft` conv1 and conv2 are plain
/// `d9d::nn::Conv2d` layers computing what the adapted net computed.
inline void expect_conv_training_and_merge(convnet::ConvNet& model, d9d::peft::PeftMethodBase& method,
                                           const std::string& adapter_key, double learning_rate) {
  const auto x = torch::randn({8, 3, 8, 8});
  const auto target = torch::randint(0, 5, {8});
  expect_training_changes_only(
      *model, [&] { return torch::nn::functional::cross_entropy(model->forward(x), target); },
      key_contains(adapter_key), learning_rate);
  torch::NoGradGuard g;
  const auto unmerged = model->forward(x);
  d9d::peft::merge_peft(method, *model);
  EXPECT_NE(model->named_modules()["conv1"]->as<d9d::nn::Conv2dImpl>(), nullptr);
  EXPECT_NE(model->named_modules()["conv2"]->as<d9d::nn::Conv2dImpl>(), nullptr);
  EXPECT_LE(conv_max_diff(model->forward(x), unmerged), 1e-5);
}

/// The fixture's net adapted by `method` (injected): `hf::save_adapter`
/// writes `dir/adapter` (and the base goes to `dir/base.safetensors`);
/// loaded into a fresh net the adapter gives the same logits; `merge_peft`
/// and the offline merge give the same weights, and conv1's changed.
inline void expect_files_round_trip(convnet::ConvNet& model, d9d::peft::PeftMethodBase& method, const TempDir& dir) {
  namespace ms = d9d::model_state;
  const auto x = conv_x();
  ms::save_safetensors(dir / "base.safetensors", ms::module_state_dict(*conv_base()));
  d9d::peft::hf::save_adapter(*model, dir / "adapter");
  torch::NoGradGuard g;
  const auto logits = model->forward(x);
  convnet::ConvNet again = conv_base();
  d9d::peft::hf::load_adapter(*again, dir / "adapter");
  EXPECT_TRUE(torch::equal(again->forward(x), logits));

  d9d::peft::merge_peft(method, *model);
  const auto merged = ms::module_state_dict(*model);
  d9d::peft::hf::merge_adapter_into_checkpoint(dir / "base.safetensors", dir / "adapter", dir / "offline", 1.0,
                                               ms::no_progress());
  const auto offline = ms::SafetensorsFile::open(dir / "offline/model.safetensors");
  for (const auto& key : offline->keys()) EXPECT_LE(conv_max_diff(offline->get(key), merged.at(key)), 1e-6) << key;
  EXPECT_FALSE(torch::equal(offline->get("conv1.weight"), conv_base()->conv1->weight));
}

/// The adapter in `dir/adapter` merged offline into a base whose conv1 has a
/// 5x5 kernel: refused with every one of `says`, nothing written.
inline void expect_offline_merge_refuses_a_5x5_conv1(const TempDir& dir, const std::vector<std::string>& says) {
  namespace ms = d9d::model_state;
  auto state = ms::module_state_dict(*conv_base());
  state["conv1.weight"] = torch::zeros({8, 3, 5, 5});
  ms::save_safetensors(dir / "other.safetensors", state);
  std::string message;
  try {
    d9d::peft::hf::merge_adapter_into_checkpoint(dir / "other.safetensors", dir / "adapter", dir / "bad", 1.0,
                                                 ms::no_progress());
  } catch (const d9d::Error& e) {
    message = e.what();
  }
  for (const auto& part : says) EXPECT_NE(message.find(part), std::string::npos) << part << " not in: " << message;
  EXPECT_FALSE(fs::exists(dir / "bad/model.safetensors"));
}

/// `Method` with `config` (targeting `head` and `conv`) on a net of a
/// Linear `head` and a Conv2d `conv` with `conv_options`: injection is
/// refused with every one of `says`, and the net is as it was.
template <typename Method, typename Config>
void expect_conv_refused_before_any_layer_changes(const Config& config, const torch::nn::Conv2dOptions& conv_options,
                                                  const std::vector<std::string>& says) {
  struct NetImpl : torch::nn::Module {
    explicit NetImpl(const torch::nn::Conv2dOptions& o)
        : head(register_module("head", d9d::nn::Linear(4, 2))), conv(register_module("conv", d9d::nn::Conv2d(o))) {}
    d9d::nn::Linear head;
    d9d::nn::Conv2d conv;
  };
  auto net = std::make_shared<NetImpl>(conv_options);
  Method method(config);
  std::string message;
  try {
    d9d::peft::inject_peft_and_freeze(method, *net);
  } catch (const d9d::peft::PeftError& e) {
    message = e.what();
  }
  for (const auto& part : says) EXPECT_NE(message.find(part), std::string::npos) << part << " not in: " << message;
  EXPECT_NE(net->named_modules()["head"]->template as<d9d::nn::LinearImpl>(), nullptr);
  EXPECT_NE(net->named_modules()["conv"]->template as<d9d::nn::Conv2dImpl>(), nullptr);
  EXPECT_EQ(d9d::peft::trainable_parameters(*net).size(), net->parameters().size()) << "nothing frozen";
}

}  // namespace d9d_test
