// LoHa: the layer against PEFT's formulas (ΔW built in forward, dropouts,
// merge), the config as PEFT reads and writes it, PEFT's fixture, training,
// and adapter files through the registry. Random PEFT configs both ways are
// in tests/peft_reference (LOHA cases).
#include "test_util.h"
#include "training_check.h"
#include "toy_model.h"

#include <d9d/peft.h>

#include <torch/nn/functional/linear.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/adamw.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::HasSubstr;
using namespace d9d_test;

namespace {

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

toy::Toy toy_base() {
  toy::Toy model;
  ms::load_model_state(kToy + "/model.safetensors", *ms::identity_mapper_from_module(*model), *model, quiet());
  model->eval();
  return model;
}

at::Tensor toy_ids() { return ms::SafetensorsFile::open(kToy + "/inputs.safetensors")->get("input_ids"); }

/// PEFT's make_weight, written out: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r.
at::Tensor formula(const peft::LoHaAdapterImpl& a) {
  return a.hada_w1_a.mm(a.hada_w1_b) * a.hada_w2_a.mm(a.hada_w2_b) * (a.options().alpha() / a.options().r());
}

peft::hf::LoHaConfig config_of(std::vector<std::string> targets, int64_t r = 4, double alpha = 8) {
  peft::hf::LoHaConfig c;
  c.target_modules.names = std::move(targets);
  c.r = r;
  c.alpha = alpha;
  c.init_weights = false;
  return c;
}

}  // namespace

TEST(LoHaLayer, ForwardIsBasePlusTheHadamardDeltaWithPeftsShapes) {
  torch::manual_seed(0);
  d9d::nn::Linear base(6, 5);
  const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
  peft::LoHaLinearImpl layer(base.ptr(), peft::LoHaParameters().r(3).alpha(5).init_weights(false));
  EXPECT_EQ(layer.hada_w1_a.sizes(), (std::vector<int64_t>{5, 3}));
  EXPECT_EQ(layer.hada_w1_b.sizes(), (std::vector<int64_t>{3, 6}));
  EXPECT_EQ(layer.hada_w2_a.sizes(), (std::vector<int64_t>{5, 3}));
  EXPECT_EQ(layer.hada_w2_b.sizes(), (std::vector<int64_t>{3, 6}));
  torch::NoGradGuard g;
  const auto x = torch::randn({4, 6});
  const auto delta = formula(layer.adapter("default"));
  EXPECT_GT(delta.abs().max().item<double>(), 1e-3);
  EXPECT_LE(max_diff(layer.delta_weight("default"), delta), 1e-6);
  EXPECT_LE(max_diff(layer.forward(x), x.mm(w.t()) + b + x.mm(delta.t())), 1e-5);
  std::vector<std::string> keys;
  for (const auto& p : layer.named_parameters()) keys.push_back(p.key());
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, (std::vector<std::string>{"base.bias", "base.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a",
                                            "hada_w2_b"}))
      << "PEFT's keys relative to the layer";
}

TEST(LoHaLayer, AdaptersInAnotherDtypeAddTheirTermInTheirDtypeAsPeft) {
  // Input, weight and ΔW of one dtype: one product with W + ΔW (checked
  // above); adapters in another: PEFT's base(x) + linear(x in ΔW's dtype, ΔW),
  // cast back to the input's dtype.
  torch::manual_seed(2);
  d9d::nn::Linear base(6, 5);
  const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
  peft::LoHaLinearImpl layer(base.ptr(), peft::LoHaParameters().r(3).alpha(5).init_weights(false));
  layer.adapter("default").to(torch::kFloat64);
  torch::NoGradGuard g;
  const auto x = torch::randn({4, 6});
  const auto delta = formula(layer.adapter("default"));
  ASSERT_EQ(delta.scalar_type(), torch::kFloat64);
  const auto y = layer.forward(x);
  EXPECT_EQ(y.scalar_type(), torch::kFloat32);
  const auto want = (x.mm(w.t()) + b).to(torch::kFloat64) + x.to(torch::kFloat64).mm(delta.t());
  EXPECT_LE(max_diff(y.to(torch::kFloat64), want), 1e-5);
}

TEST(LoHaLayer, PeftsDefaultInitIsANoOpWithW2BZero) {
  torch::manual_seed(1);
  d9d::nn::Linear base(5, 3);
  const auto x = torch::randn({2, 5});
  const auto plain = base->forward(x).detach();
  peft::LoHaLinearImpl layer(base.ptr(), peft::LoHaParameters().r(2).alpha(4));
  EXPECT_TRUE(torch::equal(layer.hada_w2_b, torch::zeros({2, 5})));
  EXPECT_GT(layer.hada_w1_a.abs().sum().item<double>(), 0.0);
  EXPECT_GT(layer.hada_w2_a.abs().sum().item<double>(), 0.0);
  // Kaiming-uniform(a=sqrt(5)) over fan_in = r: bound 1/sqrt(r).
  EXPECT_LE(layer.hada_w1_a.abs().max().item<double>(), 1.0 / std::sqrt(2.0));
  EXPECT_TRUE(torch::equal(layer.forward(x).detach(), plain));
}

TEST(LoHaLayer, SeveralAdaptersAddAndMergeRoundTrips) {
  torch::manual_seed(2);
  d9d::nn::Linear base(5, 4);
  const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
  peft::LoHaLinearImpl layer(base.ptr(), peft::LoHaParameters().r(2).alpha(3).init_weights(false), "a");
  layer.add_adapter("b", peft::LoHaParameters().r(3).alpha(1).init_weights(false));
  layer.set_active_adapters({"a", "b"});
  EXPECT_TRUE(layer.adapter("b").hada_w1_a.requires_grad());
  torch::NoGradGuard g;
  const auto x = torch::randn({3, 5});
  const auto da = formula(layer.adapter("a")), db = formula(layer.adapter("b"));
  const auto out = layer.forward(x);
  EXPECT_LE(max_diff(out, x.mm((w + da + db).t()) + b), 1e-5);

  layer.merge_adapter("a");
  EXPECT_LE(max_diff(base->weight, w + da), 1e-6);
  EXPECT_TRUE(torch::equal(base->bias, b)) << "LoHa's merge leaves the bias";
  EXPECT_LE(max_diff(layer.forward(x), out), 1e-5) << "a merged, b still computed";
  EXPECT_THAT([&] { layer.merge_adapter("a"); }, ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("a")));
  layer.unmerge_adapter("a");
  EXPECT_LE(max_diff(base->weight, w), 1e-6);

  layer.set_adapters_enabled(false);
  EXPECT_LE(max_diff(layer.forward(x), x.mm(w.t()) + b), 1e-6) << "disabled: the base alone";
  layer.set_adapters_enabled(true);
  EXPECT_THAT([&] { layer.add_adapter("c", peft::IA3Parameters()); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("takes LoHaParameters")));
  EXPECT_THAT([&] { layer.add_adapter("c", peft::LoHaParameters().r(0)); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("add_adapter(\"c\").r: must be an integer >= 1")));
}

TEST(LoHaLayer, TrainModeDropoutsFollowPeftsDraws) {
  torch::manual_seed(3);
  d9d::nn::Linear base(6, 8);
  const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
  peft::LoHaLinearImpl layer(base.ptr(), peft::LoHaParameters().r(2).alpha(2).init_weights(false).rank_dropout(0.5));
  layer.train();
  torch::NoGradGuard g;
  const auto x = torch::randn({3, 6});
  const auto delta = formula(layer.adapter("default"));
  // PEFT: torch.rand(1) for module dropout, then torch.rand(out) > p, divided by its mean.
  torch::manual_seed(7);
  at::rand({1});
  auto keep = (at::rand({8}) > 0.5).to(at::kFloat);
  keep = keep / keep.mean();
  torch::manual_seed(7);
  const auto out = layer.forward(x);
  EXPECT_LE(max_diff(out, x.mm(w.t()) + b + x.mm((delta * keep.view({-1, 1})).t())), 1e-5);
  EXPECT_GT(max_diff(out, x.mm((w + delta).t()) + b), 1e-4) << "rows were dropped";
  layer.eval();
  EXPECT_LE(max_diff(layer.forward(x), x.mm((w + delta).t()) + b), 1e-5) << "no dropout in eval";

  d9d::nn::Linear base2(6, 8);
  peft::LoHaLinearImpl skipping(base2.ptr(), peft::LoHaParameters().init_weights(false).module_dropout(0.5));
  skipping.train();
  int skipped = 0;
  torch::manual_seed(11);
  const auto draws = at::rand({40});
  torch::manual_seed(11);
  for (int i = 0; i < 40; ++i) {
    const bool skip = !(draws[i].item<double>() > 0.5);
    // The base's own forward would reach the wrapper (and draw): compute it from its weights.
    const bool same = torch::equal(skipping.forward(x), torch::nn::functional::linear(x, base2->weight, base2->bias));
    EXPECT_EQ(same, skip) << "call " << i;
    skipped += skip;
  }
  EXPECT_GT(skipped, 5);
  EXPECT_LT(skipped, 35);
}

TEST(LoHaFiles, PeftsFixtureGivesPeftsLogitsMergedWeightsAndOfflineMerge) {
  const std::string dir = kToy + "/tuners/loha";
  const auto expected = ms::SafetensorsFile::open(dir + "/expected.safetensors");
  const auto ids = toy_ids();
  toy::Toy model = toy_base();
  auto method = peft::hf::load_adapter(*model, dir);
  EXPECT_NE(dynamic_cast<peft::LoHa*>(method.get()), nullptr) << "the registry picked LoHa from peft_type";
  torch::NoGradGuard g;
  const auto plain = toy_base()->forward(ids);
  EXPECT_GT(max_diff(expected->get("logits"), plain), 1e-3) << "the fixture's adapter changes the logits";
  EXPECT_LE(max_diff(model->forward(ids), expected->get("logits")), 1e-5);
  peft::merge_peft(*method, model);
  EXPECT_NE(model->named_modules()["layers.0.attention.q_proj"]->as<d9d::nn::LinearImpl>(), nullptr);
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
  EXPECT_GT(merged, 0u);

  // The command line: `d9d-peft merge` writes the same weights, `inspect` shows the LoHa tensors.
  const std::string cli = D9D_PEFT_CLI;
  ASSERT_EQ(std::system(("'" + cli + "' merge --base '" + kToy + "/model.safetensors' --adapter '" + dir + "' --out '" +
                         (out / "cli") + "' > '" + (out / "merge.log") + "' 2>&1")
                            .c_str()),
            0)
      << read_bytes(out / "merge.log");
  const auto by_cli = ms::SafetensorsFile::open(out / "cli/model.safetensors");
  for (const auto& key : expected->keys()) {
    if (key.rfind("merged.", 0) == 0) EXPECT_LE(max_diff(by_cli->get(key.substr(7)), expected->get(key)), 1e-5) << key;
  }
  ASSERT_EQ(std::system(("'" + cli + "' inspect '" + dir + "' > '" + (out / "inspect.log") + "' 2>&1").c_str()), 0);
  const std::string shown = read_bytes(out / "inspect.log");
  EXPECT_THAT(shown, HasSubstr("LOHA"));
  EXPECT_THAT(shown, HasSubstr("base_model.model.layers.1.attention.v_proj.hada_w2_b"));
}

TEST(LoHaMethod, TrainingLowersTheLossAndChangesOnlyLoHaTensors) {
  toy::Toy model = toy_base();
  const auto ids = toy_ids();
  torch::manual_seed(4);
  peft::hf::LoHaConfig config;
  config.target_modules.regex = ".*(q|v|up)_proj";
  config.r = 4;
  config.alpha = 8;
  peft::LoHa loha(config);
  peft::inject_peft_and_freeze(loha, model);
  const auto trainable = peft::trainable_parameters(*model);
  EXPECT_EQ(trainable.size(), 2u * 3u * 4u) << "2 layers x 3 projections x 4 factors";
  expect_training_changes_only(*model, next_token_loss(model, ids), key_contains(".hada_w"), 1e-2);
  torch::NoGradGuard g;
  const auto unmerged = model->forward(ids);
  peft::merge_peft(loha, model);
  EXPECT_LE(max_diff(model->forward(ids), unmerged), 1e-5);
}

TEST(LoHaFiles, SaveThenLoadThroughTheRegistryRoundTrips) {
  const auto ids = toy_ids();
  toy::Toy model = toy_base();
  torch::manual_seed(5);
  auto config = config_of({"v_proj", "up_proj", "down_proj"}, 4, 8);
  config.rank_pattern = {{"down_proj", 2}};
  config.alpha_pattern = {{"up_proj", 3}};
  peft::LoHa loha(config);
  peft::inject_peft_and_freeze(loha, model);
  TempDir dir;
  peft::hf::save_adapter(*model, dir.str());
  const auto written = nlohmann::json::parse(read_bytes(dir / "adapter_config.json"));
  EXPECT_EQ(written["peft_type"], "LOHA");
  EXPECT_EQ(written["r"], 4);
  EXPECT_EQ(written["rank_pattern"]["layers\\.0\\.mlp\\.down_proj"], 2);
  EXPECT_EQ(written["alpha_pattern"]["layers\\.1\\.mlp\\.up_proj"], 3);
  const auto weights = ms::SafetensorsFile::open(dir / "adapter_model.safetensors");
  EXPECT_EQ(weights->get("base_model.model.layers.0.mlp.down_proj.hada_w1_a").sizes(), (std::vector<int64_t>{16, 2}));
  EXPECT_EQ(weights->get("base_model.model.layers.0.mlp.down_proj.hada_w2_b").sizes(), (std::vector<int64_t>{2, 40}));

  toy::Toy again = toy_base();
  auto loaded = peft::hf::load_adapter(*again, dir.str());
  torch::NoGradGuard g;
  EXPECT_TRUE(torch::equal(again->forward(ids), model->forward(ids)));
  peft::hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", dir.str(), dir / "merged", 1.0,
                                          ms::no_progress());
  peft::merge_peft(*loaded, again);
  const auto merged = ms::SafetensorsFile::open(dir / "merged/model.safetensors");
  for (const auto& [key, value] : ms::module_state_dict(*again)) {
    EXPECT_LE(max_diff(merged->get(key), value), 1e-6) << key;
  }

  // A base whose down_proj is wider: refused with the layout PEFT would build
  // at that layer's rank_pattern rank, and nothing written.
  auto state = ms::module_state_dict(*toy_base());
  state["layers.0.mlp.down_proj.weight"] = torch::zeros({16, 41});
  ms::save_safetensors(dir / "other.safetensors", state);
  EXPECT_THAT([&] {
    peft::hf::merge_adapter_into_checkpoint(dir / "other.safetensors", dir.str(), dir / "bad", 1.0, ms::no_progress());
  }, ::testing::ThrowsMessage<peft::PeftError>(::testing::AllOf(
         HasSubstr("'layers.0.mlp.down_proj.weight' has shape [16, 41]"), HasSubstr("with r=2 holds"),
         HasSubstr("hada_w2_b [2, 41]"), HasSubstr("the adapter holds"), HasSubstr("hada_w2_b [2, 40]"))));
  EXPECT_FALSE(std::filesystem::exists(dir / "bad/model.safetensors"));
}

TEST(LoHaMethod, MergeRefusesNaNAndLeavesTheModel) {
  toy::Toy model = toy_base();
  peft::LoHa loha(config_of({"q_proj"}));
  peft::inject_peft_and_freeze(loha, model);
  auto* q = model->named_modules()["layers.0.attention.q_proj"]->as<peft::LoHaLinearImpl>();
  ASSERT_NE(q, nullptr);
  const auto w = q->base_weight().clone();
  {
    torch::NoGradGuard g;
    q->hada_w1_a[0][0] = NAN;
  }
  EXPECT_THAT([&] { peft::merge_peft(loha, model); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("NaN or Inf")));
  EXPECT_TRUE(torch::equal(q->base_weight(), w));
  EXPECT_NE(model->named_modules()["layers.0.attention.q_proj"]->as<peft::LoHaLinearImpl>(), nullptr);
}

TEST(LoHaConfig, PeftsFieldsAndErrorsNameTheField) {
  const auto c = peft::hf::parse_loha_config(
      nlohmann::json::parse(read_bytes(kToy + "/tuners/loha/adapter_config.json")), "adapter_config.json");
  EXPECT_EQ(c.r, 4);
  EXPECT_EQ(c.alpha, 8);
  EXPECT_FALSE(c.init_weights);
  EXPECT_TRUE(c.select("layers.0.attention.v_proj").has_value());
  EXPECT_FALSE(c.select("layers.0.attention.k_proj").has_value());
  auto error_of = [](const std::string& text) {
    try {
      peft::hf::parse_loha_config(nlohmann::json::parse(text), "cfg");
    } catch (const peft::ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(error_of(R"({"peft_type":"LOHA","target_modules":["q"],"r":0})"), HasSubstr("cfg: r: must be an integer >= 1"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOHA","target_modules":["q"],"rank_dropout":1.5})"),
              HasSubstr("cfg: rank_dropout: must be a number in [0, 1)"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOHA","target_modules":["q"],"layers_to_transform":[0]})"),
              HasSubstr("cfg: layers_to_transform: [0] is not supported"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOHA","target_modules":["q"],"modules_to_save":["lm_head"]})"),
              HasSubstr("cfg: modules_to_save: "));
  EXPECT_THAT(error_of(R"({"peft_type":"LOHA","target_modules":["q"],"decompose_both":true})"),
              HasSubstr("cfg: decompose_both: true is not supported"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOHA","target_modules":["q"],"alpha_pattern":{"q":-1}})"),
              HasSubstr("cfg: alpha_pattern.q: must be a finite number > 0"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOHA","target_modules":["q"],"rank_pattern":{"q((":2}})"),
              HasSubstr("cfg: rank_pattern.q((: the key is not a valid pattern"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOHA"})"), HasSubstr("cfg: target_modules: must name the modules"));
  // use_effective_conv2d changes only convolutions in PEFT: kept, no effect on linear layers.
  EXPECT_TRUE(peft::hf::parse_loha_config(nlohmann::json::parse(
                                              R"({"peft_type":"LOHA","target_modules":["q"],"use_effective_conv2d":true})"),
                                          "cfg")
                  .use_effective_conv2d);
  // What we write, we read back the same.
  const auto again = peft::hf::parse_loha_config(nlohmann::json::parse(peft::hf::dump_loha_config(c)), "dumped");
  EXPECT_EQ(again.target_modules.names, c.target_modules.names);
  EXPECT_EQ(again.r, c.r);
  EXPECT_EQ(again.alpha, c.alpha);
  EXPECT_EQ(again.init_weights, c.init_weights);
}

TEST(LoHaConfig, D9dJsonParsesDumpsAndStacksWithLora) {
  const std::string text =
      R"json({"kind":"loha","module_name_pattern":".*(k_proj|down_proj)","params":{"r":4,"alpha":8,"rank_dropout":0.0,"module_dropout":0.0,"use_effective_conv2d":false,"init_weights":true}})json";
  EXPECT_EQ(peft::dump_peft_config(peft::parse_peft_config(text)), text);
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"loha","module_name_pattern":"x","params":{"r":4}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.alpha")));
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"loha","module_name_pattern":"x","params":{"r":4,"alpha":2,"rank_dropout":1}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.rank_dropout: must be in [0, 1)")));
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"loha","module_name_pattern":"x","params":{"r":4,"alpha":2,"dropout":0.1}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("dropout")));
  const auto stack = peft::parse_peft_config(
      R"({"kind":"stack","methods":[{"kind":"lora","module_name_pattern":".*q_proj","params":{"r":2,"alpha":4,"dropout":0.0}},)"
      + text + "]}");
  toy::Toy model = toy_base();
  const auto ids = toy_ids();
  torch::NoGradGuard g;
  const auto plain = model->forward(ids);
  auto method = peft::peft_method_from_config(stack);
  peft::inject_peft_and_freeze(*method, model);
  EXPECT_NE(model->named_modules()["layers.0.attention.q_proj"]->as<peft::LoRALinearImpl>(), nullptr);
  auto* down = model->named_modules()["layers.0.mlp.down_proj"]->as<peft::LoHaLinearImpl>();
  ASSERT_NE(down, nullptr);
  EXPECT_TRUE(down->hada_w1_a.requires_grad());
  EXPECT_LE(max_diff(model->forward(ids), plain), 1e-6) << "fresh LoRA and LoHa are no-ops";
}
