// IA3: the layer against PEFT's formulas, merge and unmerge, the config as
// PEFT reads and writes it, and adapter files through the registry. Real
// PEFT's numbers are checked by tests/peft_reference (IA3 cases).
#include "test_util.h"
#include "toy_model.h"

#include <d9d/peft.h>

#include <torch/nn/modules/container/sequential.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::HasSubstr;
using namespace d9d_test;

namespace {

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

peft::hf::IA3Config config_of(std::vector<std::string> targets, std::vector<std::string> feedforward, bool ones = false) {
  peft::hf::IA3Config c;
  c.target_modules.names = std::move(targets);
  c.feedforward_modules.names = std::move(feedforward);
  c.init_ia3_weights = ones;
  return c;
}

toy::Toy toy_base() {
  toy::Toy model;
  ms::load_model_state(kToy + "/model.safetensors", *ms::identity_mapper_from_module(*model), *model, quiet());
  model->eval();
  return model;
}

}  // namespace

TEST(IA3Layer, OutputAndInputScalingAreThePeftFormulas) {
  torch::manual_seed(0);
  d9d::nn::Linear base(6, 4);
  const auto x = torch::randn({3, 6});
  torch::NoGradGuard g;
  const auto w = base->weight.clone(), b = base->bias.clone();
  peft::IA3LinearImpl out_layer(base.ptr(), peft::IA3Parameters().init_ones(false));
  EXPECT_EQ(out_layer.ia3_l.sizes(), (std::vector<int64_t>{4, 1}));
  EXPECT_LE(max_diff(out_layer.forward(x), (x.mm(w.t()) + b) * out_layer.ia3_l.flatten()), 1e-6)
      << "base(x) * l, the bias scaled too";

  d9d::nn::Linear base2(6, 4);
  const auto w2 = base2->weight.clone(), b2 = base2->bias.clone();
  peft::IA3LinearImpl ff_layer(base2.ptr(), peft::IA3Parameters().feedforward(true).init_ones(false));
  EXPECT_EQ(ff_layer.ia3_l.sizes(), (std::vector<int64_t>{1, 6}));
  EXPECT_LE(max_diff(ff_layer.forward(x), (x * ff_layer.ia3_l.flatten()).mm(w2.t()) + b2), 1e-6) << "base(x * l)";
}

TEST(IA3Layer, FreshVectorsAreOnesAndLeaveTheOutputAlone) {
  torch::manual_seed(1);
  d9d::nn::Linear base(5, 3);
  const auto x = torch::randn({2, 5});
  const auto plain = base->forward(x).detach();
  peft::IA3LinearImpl layer(base.ptr(), peft::IA3Parameters());
  EXPECT_TRUE(torch::equal(layer.ia3_l, torch::ones({3, 1})));
  EXPECT_TRUE(torch::equal(layer.forward(x).detach(), plain));
}

TEST(IA3Layer, SeveralActiveAdaptersMultiplyAndMergeRoundTrips) {
  torch::manual_seed(2);
  d9d::nn::Linear base(5, 3);
  const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
  peft::IA3LinearImpl layer(base.ptr(), peft::IA3Parameters().init_ones(false), "a");
  layer.add_adapter("b", peft::IA3Parameters().init_ones(false));
  layer.set_active_adapters({"a", "b"});
  torch::NoGradGuard g;
  const auto x = torch::randn({4, 5});
  const auto la = layer.adapter("a").ia3_l.flatten(), lb = layer.adapter("b").ia3_l.flatten();
  const auto out = layer.forward(x);
  EXPECT_LE(max_diff(out, (x.mm(w.t()) + b) * la * lb), 1e-5);

  layer.merge_adapter("a");
  EXPECT_LE(max_diff(base->weight, w * la.view({-1, 1})), 1e-6) << "rows scaled";
  EXPECT_LE(max_diff(base->bias, b * la), 1e-6);
  EXPECT_LE(max_diff(layer.forward(x), out), 1e-5) << "a merged, b still computed";
  layer.unmerge_adapter("a");
  EXPECT_LE(max_diff(base->weight, w), 1e-5);
  EXPECT_LE(max_diff(base->bias, b), 1e-5);
  EXPECT_THROW(layer.delta_weight("a"), peft::PeftError);
  EXPECT_THAT([&] { layer.add_adapter("c", peft::IA3Parameters().feedforward(true)); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("agrees on feedforward_modules")));
}

TEST(IA3Layer, FeedForwardMergeScalesColumnsAndLeavesTheBias) {
  torch::manual_seed(3);
  d9d::nn::Linear base(5, 3);
  const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
  peft::IA3LinearImpl layer(base.ptr(), peft::IA3Parameters().feedforward(true).init_ones(false));
  layer.merge_adapter("default");
  EXPECT_LE(max_diff(base->weight, w * layer.ia3_l), 1e-6);
  EXPECT_TRUE(torch::equal(base->bias, b));
}

TEST(IA3Method, InjectsIntoTheToyAndMergesBack) {
  toy::Toy model = toy_base();
  const auto ids = ms::SafetensorsFile::open(kToy + "/inputs.safetensors")->get("input_ids");
  torch::NoGradGuard g;
  const auto before = model->forward(ids);
  torch::manual_seed(4);
  peft::IA3 ia3(config_of({"q_proj", "down_proj"}, {"down_proj"}));
  auto mapper = peft::inject_peft_and_freeze(ia3, model);
  auto* down = model->named_modules()["layers.0.mlp.down_proj"]->as<peft::IA3LinearImpl>();
  ASSERT_NE(down, nullptr);
  EXPECT_TRUE(down->feedforward());
  EXPECT_FALSE(model->named_modules()["layers.0.attention.q_proj"]->as<peft::IA3LinearImpl>()->feedforward());
  const auto trainable = peft::trainable_parameters(*model);
  EXPECT_EQ(trainable.size(), 4u) << "one vector per adapted layer, nothing else";
  const auto adapted = model->forward(ids);
  EXPECT_GT(max_diff(adapted, before), 1e-3);
  // A standard checkpoint loads through the mapper.
  EXPECT_TRUE(ms::load_model_state(kToy + "/model.safetensors", *mapper, *model, quiet()).ok());
  peft::merge_peft(ia3, model);
  EXPECT_NE(model->named_modules()["layers.0.mlp.down_proj"]->as<d9d::nn::LinearImpl>(), nullptr);
  EXPECT_LE(max_diff(model->forward(ids), adapted), 1e-4);
}

TEST(IA3Method, OneLayerHoldsOneMethod) {
  toy::Toy model = toy_base();
  peft::IA3 ia3(config_of({"q_proj"}, {}, true));
  peft::inject_peft_and_freeze(ia3, model);
  peft::hf::LoraConfig lora;
  lora.target_modules.names = {"q_proj"};
  EXPECT_THAT([&] { peft::hf::add_adapter(*model, "lora", lora); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("is already a IA3 adapter layer")));
  EXPECT_EQ(peft::adapter_names(*model), (std::vector<std::string>{"default"}));
}

TEST(IA3Config, PeftsRulesAndErrors) {
  const auto c = peft::hf::parse_ia3_config(
      nlohmann::json::parse(R"({"peft_type":"IA3","target_modules":["q_proj","down_proj"],
                                "feedforward_modules":["down_proj"],"init_ia3_weights":true,"fan_in_fan_out":false})"),
      "cfg");
  EXPECT_TRUE(c.select("layers.0.mlp.down_proj")->feedforward());
  EXPECT_FALSE(c.select("layers.0.attention.q_proj")->feedforward());
  EXPECT_FALSE(c.select("layers.0.attention.k_proj").has_value());
  EXPECT_THAT([] { peft::hf::parse_ia3_config(nlohmann::json::parse(R"({"peft_type":"IA3","target_modules":["q_proj"],
                                                                   "feedforward_modules":["down_proj"]})"),
                                          "cfg"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("cfg: feedforward_modules: \"down_proj\" is not in "
                                                                    "target_modules")));
  EXPECT_THAT([] { peft::hf::parse_ia3_config(nlohmann::json::parse(R"({"peft_type":"IA3","target_modules":["q"],
                                                                   "fan_in_fan_out":true})"),
                                          "cfg"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("cfg: fan_in_fan_out: true is not supported")));
  EXPECT_THAT([] { peft::hf::parse_ia3_config(nlohmann::json::parse(R"({"peft_type":"IA3","target_modules":"q(("})"), "cfg"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("cfg: target_modules: invalid regular expression")));
  // What we write, we read back the same.
  const auto again = peft::hf::parse_ia3_config(nlohmann::json::parse(peft::hf::dump_ia3_config(c)), "dumped");
  EXPECT_EQ(again.target_modules.names, c.target_modules.names);
  EXPECT_EQ(again.feedforward_modules.names, c.feedforward_modules.names);
}

TEST(IA3Files, SaveThenLoadThroughTheRegistryRoundTrips) {
  const auto ids = ms::SafetensorsFile::open(kToy + "/inputs.safetensors")->get("input_ids");
  toy::Toy model = toy_base();
  torch::manual_seed(5);
  peft::IA3 ia3(config_of({"v_proj", "up_proj", "down_proj"}, {"down_proj"}));
  peft::inject_peft_and_freeze(ia3, model);
  TempDir dir;
  peft::hf::save_adapter(*model, dir.str());
  const auto written = nlohmann::json::parse(read_bytes(dir / "adapter_config.json"));
  EXPECT_EQ(written["peft_type"], "IA3");
  const auto weights = ms::SafetensorsFile::open(dir / "adapter_model.safetensors");
  EXPECT_TRUE(weights->contains("base_model.model.layers.0.mlp.down_proj.ia3_l"));
  EXPECT_EQ(weights->get("base_model.model.layers.0.mlp.down_proj.ia3_l").sizes(), (std::vector<int64_t>{1, 40}));

  toy::Toy again = toy_base();
  auto loaded = peft::hf::load_adapter(*again, dir.str());
  torch::NoGradGuard g;
  EXPECT_TRUE(torch::equal(again->forward(ids), model->forward(ids)));
  EXPECT_NE(dynamic_cast<peft::IA3*>(loaded.get()), nullptr) << "the registry picked IA3 from peft_type";

  // The offline merge gives what merging in the model gives.
  peft::hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", dir.str(), dir / "merged", 1.0,
                                          ms::no_progress());
  peft::merge_peft(*loaded, again);
  const auto merged = ms::SafetensorsFile::open(dir / "merged/model.safetensors");
  for (const auto& [key, value] : ms::module_state_dict(*again)) {
    ASSERT_TRUE(merged->contains(key)) << key;
    EXPECT_LE(max_diff(merged->get(key), value), 1e-6) << key;
  }
  EXPECT_THAT([&] { peft::hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", dir.str(), dir / "half", 0.5,
                                                            ms::no_progress()); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("--scale 0.5 has no meaning")));
}

TEST(IA3Files, PeftsFixtureGivesPeftsLogitsMergedWeightsAndOfflineMerge) {
  const std::string dir = kToy + "/tuners/ia3";
  const auto expected = ms::SafetensorsFile::open(dir + "/expected.safetensors");
  const auto ids = ms::SafetensorsFile::open(kToy + "/inputs.safetensors")->get("input_ids");
  toy::Toy model = toy_base();
  auto method = peft::hf::load_adapter(*model, dir);
  torch::NoGradGuard g;
  EXPECT_LE(max_diff(model->forward(ids), expected->get("logits")), 1e-5);
  peft::merge_peft(*method, model);
  EXPECT_LE(max_diff(model->forward(ids), expected->get("merged_logits")), 1e-5);
  TempDir out;
  peft::hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", dir, out / "merged", 1.0, ms::no_progress());
  const auto offline = ms::SafetensorsFile::open(out / "merged/model.safetensors");
  const auto state = ms::module_state_dict(*model);
  size_t merged = 0;
  for (const auto& key : expected->keys()) {
    if (key.rfind("merged.", 0) != 0) continue;
    ++merged;
    const std::string name = key.substr(7);
    EXPECT_LE(max_diff(state.at(name), expected->get(key)), 1e-5) << name;
    EXPECT_LE(max_diff(offline->get(name), expected->get(key)), 1e-5) << "offline " << name;
  }
  EXPECT_GT(merged, 0u) << "the fixture lists the weights IA3 changes";
}

TEST(IA3Config, D9dJsonParsesDumpsAndStacksWithLora) {
  const std::string text =
      R"json({"kind":"ia3","module_name_pattern":".*(k_proj|down_proj)","params":{"feedforward_pattern":".*down_proj"}})json";
  EXPECT_EQ(peft::dump_peft_config(peft::parse_peft_config(text)), text);
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"ia3","module_name_pattern":"x","params":{"feedforward_pattern":"("}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.feedforward_pattern: invalid regular expression")));
  const auto stack = peft::parse_peft_config(
      R"({"kind":"stack","methods":[{"kind":"lora","module_name_pattern":".*q_proj","params":{"r":2,"alpha":4,"dropout":0.0}},)"
      + text + "]}");
  toy::Toy model = toy_base();
  auto method = peft::peft_method_from_config(stack);
  peft::inject_peft_and_freeze(*method, model);
  EXPECT_NE(model->named_modules()["layers.0.attention.q_proj"]->as<peft::LoRALinearImpl>(), nullptr);
  auto* down = model->named_modules()["layers.0.mlp.down_proj"]->as<peft::IA3LinearImpl>();
  ASSERT_NE(down, nullptr);
  EXPECT_TRUE(down->feedforward());
  EXPECT_TRUE(down->ia3_l.requires_grad());
  EXPECT_FALSE(model->named_modules()["layers.0.attention.k_proj"]->as<peft::IA3LinearImpl>()->feedforward());
}
