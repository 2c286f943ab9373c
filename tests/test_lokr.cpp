// LoKr through files and methods: PEFT's fixture (logits, merged weights,
// the offline merge and the command line), training, save and load through
// the registry, NaN refusal, and the config as PEFT reads and writes it and
// in d9d's JSON. The arithmetic and the layer are in test_lokr_layer.cpp;
// random PEFT configs both ways are in tests/peft_reference (LOKR cases).
#include "test_util.h"
#include "training_check.h"
#include "toy_model.h"

#include <d9d/peft.h>

#include <torch/nn/functional/loss.h>
#include <torch/optim/adamw.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>

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

peft::hf::LoKrConfig config_of(std::vector<std::string> targets, int64_t r = 4, double alpha = 8) {
  peft::hf::LoKrConfig c;
  c.target_modules.names = std::move(targets);
  c.r = r;
  c.alpha = alpha;
  c.init_weights = peft::LoKrInit::kRandom;
  return c;
}

}  // namespace

TEST(LoKrFiles, PeftsFixtureGivesPeftsLogitsMergedWeightsAndOfflineMerge) {
  const std::string dir = kToy + "/tuners/lokr";
  const auto expected = ms::SafetensorsFile::open(dir + "/expected.safetensors");
  const auto ids = toy_ids();
  toy::Toy model = toy_base();
  auto method = peft::hf::load_adapter(*model, dir);
  EXPECT_NE(dynamic_cast<peft::LoKr*>(method.get()), nullptr) << "the registry picked LoKr from peft_type";
  torch::NoGradGuard g;
  const auto plain = toy_base()->forward(ids);
  EXPECT_GT(max_diff(expected->get("logits"), plain), 1e-3) << "the fixture's adapter changes the logits";
  const double logits_diff = max_diff(model->forward(ids), expected->get("logits"));
  EXPECT_LE(logits_diff, 1e-5);
  peft::merge_peft(*method, model);
  EXPECT_NE(model->named_modules()["layers.0.attention.q_proj"]->as<d9d::nn::LinearImpl>(), nullptr);
  const double merged_logits_diff = max_diff(model->forward(ids), expected->get("merged_logits"));
  EXPECT_LE(merged_logits_diff, 1e-5);
  TempDir out;
  peft::hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", dir, out / "merged", 1.0, ms::no_progress());
  const auto offline = ms::SafetensorsFile::open(out / "merged/model.safetensors");
  const auto state = ms::module_state_dict(*model);
  size_t merged = 0;
  double worst = 0;
  for (const auto& key : expected->keys()) {
    if (key.rfind("merged.", 0) != 0) continue;
    ++merged;
    const std::string name = key.substr(7);
    worst = std::max({worst, max_diff(state.at(name), expected->get(key)), max_diff(offline->get(name), expected->get(key))});
    EXPECT_LE(max_diff(state.at(name), expected->get(key)), 1e-5) << name;
    EXPECT_LE(max_diff(offline->get(name), expected->get(key)), 1e-5) << "offline " << name;
  }
  EXPECT_EQ(merged, 4u) << "q_proj and up_proj in both layers";
  std::printf("LoKr fixture: max |d9d - peft| logits %.3g, merged logits %.3g, merged weights %.3g\n", logits_diff,
              merged_logits_diff, worst);

  // The command line: `d9d-peft merge` writes the same weights, `inspect` shows the LoKr tensors.
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
  EXPECT_THAT(shown, HasSubstr("LOKR"));
  EXPECT_THAT(shown, HasSubstr("base_model.model.layers.1.mlp.up_proj.lokr_w2"));
}

TEST(LoKrMethod, TrainingLowersTheLossAndChangesOnlyLoKrTensors) {
  toy::Toy model = toy_base();
  const auto ids = toy_ids();
  torch::manual_seed(4);
  peft::hf::LoKrConfig config;
  config.target_modules.regex = ".*(q|v|up)_proj";
  config.r = 2;  // w1 whole [4, 4] / [5, 4]; w2 whole [4, 4] on q, v, factored [8, 2] @ [2, 4] on up
  config.alpha = 8;
  peft::LoKr lokr(config);
  peft::inject_peft_and_freeze(lokr, model);
  const auto trainable = peft::trainable_parameters(*model);
  EXPECT_EQ(trainable.size(), 2u * (2u * 2u + 3u)) << "2 layers x (q, v: w1, w2; up: w1, w2_a, w2_b)";
  expect_training_changes_only(*model, next_token_loss(model, ids), key_contains(".lokr_w"), 1e-2);
  torch::NoGradGuard g;
  const auto unmerged = model->forward(ids);
  peft::merge_peft(lokr, model);
  EXPECT_LE(max_diff(model->forward(ids), unmerged), 1e-5);
}

TEST(LoKrFiles, SaveThenLoadThroughTheRegistryRoundTrips) {
  const auto ids = toy_ids();
  toy::Toy model = toy_base();
  torch::manual_seed(5);
  auto config = config_of({"v_proj", "up_proj", "down_proj"}, 4, 8);
  config.decompose_both = true;
  config.rank_pattern = {{"down_proj", 1}};
  config.alpha_pattern = {{"up_proj", 3}};
  config.rank_dropout = 0.1;
  config.rank_dropout_scale = true;
  peft::LoKr lokr(config);
  peft::inject_peft_and_freeze(lokr, model);
  TempDir dir;
  peft::hf::save_adapter(*model, dir.str());
  const auto written = nlohmann::json::parse(read_bytes(dir / "adapter_config.json"));
  EXPECT_EQ(written["peft_type"], "LOKR");
  EXPECT_EQ(written["r"], 4);
  EXPECT_EQ(written["decompose_both"], true);
  EXPECT_EQ(written["decompose_factor"], -1);
  EXPECT_EQ(written["rank_dropout_scale"], true);
  EXPECT_EQ(written["init_weights"], false);
  EXPECT_EQ(written["rank_pattern"]["layers\\.0\\.mlp\\.down_proj"], 1);
  EXPECT_EQ(written["alpha_pattern"]["layers\\.1\\.mlp\\.up_proj"], 3);
  const auto weights = ms::SafetensorsFile::open(dir / "adapter_model.safetensors");
  // down_proj [16, 40], r 1: w1 [4, 5] as [4, 1] @ [1, 5], w2 [4, 8] as [4, 1] @ [1, 8].
  EXPECT_EQ(weights->get("base_model.model.layers.0.mlp.down_proj.lokr_w1_a").sizes(), (std::vector<int64_t>{4, 1}));
  EXPECT_EQ(weights->get("base_model.model.layers.0.mlp.down_proj.lokr_w2_b").sizes(), (std::vector<int64_t>{1, 8}));
  EXPECT_EQ(weights->get("base_model.model.layers.0.attention.v_proj.lokr_w1").sizes(), (std::vector<int64_t>{4, 4}));
  EXPECT_EQ(weights->keys().count("base_model.model.layers.0.attention.v_proj.lokr_w1_a"), 0u);

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
  // A layer holding both forms of w1, or a layout PEFT would not build for the config, is refused by name.
  auto tensors = ms::SafetensorsFile::open(dir / "adapter_model.safetensors")->load_all();
  tensors["base_model.model.layers.0.attention.v_proj.lokr_w1_a"] = torch::zeros({4, 4});
  tensors["base_model.model.layers.0.attention.v_proj.lokr_w1_b"] = torch::zeros({4, 4});
  auto offline_merge_error = [&] {
    ms::save_safetensors(dir / "adapter_model.safetensors", tensors);
    try {
      peft::hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", dir.str(), dir / "bad", 1.0,
                                              ms::no_progress());
    } catch (const peft::PeftError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(offline_merge_error(), HasSubstr("'layers.0.attention.v_proj' must hold either lokr_w1 or both lokr_w1_a"));
  tensors.erase("base_model.model.layers.0.attention.v_proj.lokr_w1");
  EXPECT_THAT(offline_merge_error(),
              HasSubstr("'layers.0.attention.v_proj.weight' has shape [16, 16], for which PEFT's LoKr with r=4, "
                        "decompose_both=true, decompose_factor=-1 holds lokr_w1 [4, 4], lokr_w2 [4, 4]; the adapter "
                        "holds lokr_w1_a [4, 4], lokr_w1_b [4, 4], lokr_w2 [4, 4]"));
  EXPECT_FALSE(std::filesystem::exists(dir / "bad/model.safetensors")) << "nothing written";
}

TEST(LoKrMethod, MergeRefusesNaNAndLeavesTheModel) {
  toy::Toy model = toy_base();
  peft::LoKr lokr(config_of({"q_proj"}));
  peft::inject_peft_and_freeze(lokr, model);
  auto* q = model->named_modules()["layers.0.attention.q_proj"]->as<peft::LoKrLinearImpl>();
  ASSERT_NE(q, nullptr);
  const auto w = q->base_weight().clone();
  {
    torch::NoGradGuard g;
    q->lokr_w2[0][0] = NAN;
  }
  EXPECT_THAT([&] { peft::merge_peft(lokr, model); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("NaN or Inf")));
  EXPECT_TRUE(torch::equal(q->base_weight(), w));
  EXPECT_NE(model->named_modules()["layers.0.attention.q_proj"]->as<peft::LoKrLinearImpl>(), nullptr);
}

TEST(LoKrConfig, PeftsFieldsAndErrorsNameTheField) {
  const auto c = peft::hf::parse_lokr_config(
      nlohmann::json::parse(read_bytes(kToy + "/tuners/lokr/adapter_config.json")), "adapter_config.json");
  EXPECT_EQ(c.r, 4);
  EXPECT_EQ(c.alpha, 8);
  EXPECT_FALSE(c.decompose_both);
  EXPECT_EQ(c.decompose_factor, -1);
  EXPECT_EQ(c.init_weights, peft::LoKrInit::kRandom);
  EXPECT_TRUE(c.select("layers.0.mlp.up_proj").has_value());
  EXPECT_FALSE(c.select("layers.0.attention.k_proj").has_value());
  auto error_of = [](const std::string& text) {
    try {
      peft::hf::parse_lokr_config(nlohmann::json::parse(text), "cfg");
    } catch (const peft::ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(error_of(R"({"peft_type":"LOKR","target_modules":["q"],"r":0})"), HasSubstr("cfg: r: must be an integer >= 1"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOKR","target_modules":["q"],"rank_dropout":1.5})"),
              HasSubstr("cfg: rank_dropout: must be a number in [0, 1)"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOKR","target_modules":["q"],"decompose_factor":2.5})"),
              HasSubstr("cfg: decompose_factor: must be an integer"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOKR","target_modules":["q"],"decompose_both":1})"),
              HasSubstr("cfg: decompose_both: expected true or false"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOKR","target_modules":["q"],"init_weights":"gaussian"})"),
              HasSubstr("cfg: init_weights: expected true, false or \"lycoris\", got \"gaussian\""));
  EXPECT_THAT(error_of(R"({"peft_type":"LOKR","target_modules":["q"],"layers_to_transform":[0]})"),
              HasSubstr("cfg: layers_to_transform: [0] is not supported"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOKR","target_modules":["q"],"modules_to_save":["lm_head"]})"),
              HasSubstr("cfg: modules_to_save: "));
  EXPECT_THAT(error_of(R"({"peft_type":"LOKR","target_modules":["q"],"use_dora":true})"),
              HasSubstr("cfg: use_dora: true is not supported"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOKR","target_modules":["q"],"alpha_pattern":{"q":-1}})"),
              HasSubstr("cfg: alpha_pattern.q: must be a finite number > 0"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOKR","target_modules":["q"],"rank_pattern":{"q((":2}})"),
              HasSubstr("cfg: rank_pattern.q((: the key is not a valid pattern"));
  EXPECT_THAT(error_of(R"({"peft_type":"LOHA","target_modules":["q"]})"), HasSubstr("cfg: peft_type: \"LOHA\" is not \"LOKR\""));
  EXPECT_THAT(error_of(R"({"peft_type":"LOKR"})"), HasSubstr("cfg: target_modules: must name the modules"));
  const auto lycoris = peft::hf::parse_lokr_config(
      nlohmann::json::parse(R"({"peft_type":"LOKR","target_modules":["q"],"init_weights":"lycoris","use_effective_conv2d":true})"),
      "cfg");
  EXPECT_EQ(lycoris.init_weights, peft::LoKrInit::kLycoris);
  EXPECT_TRUE(lycoris.use_effective_conv2d) << "kept; PEFT ignores it on linear layers";
  EXPECT_EQ(nlohmann::json::parse(peft::hf::dump_lokr_config(lycoris))["init_weights"], "lycoris");
  // What we write, we read back the same.
  const auto again = peft::hf::parse_lokr_config(nlohmann::json::parse(peft::hf::dump_lokr_config(c)), "dumped");
  EXPECT_EQ(again.target_modules.names, c.target_modules.names);
  EXPECT_EQ(again.r, c.r);
  EXPECT_EQ(again.alpha, c.alpha);
  EXPECT_EQ(again.init_weights, c.init_weights);
}

TEST(LoKrConfig, D9dJsonParsesDumpsAndStacksWithLora) {
  const std::string text =
      R"json({"kind":"lokr","module_name_pattern":".*(k_proj|down_proj)","params":{"r":1,"alpha":8,"rank_dropout":0.0,"module_dropout":0.0,"rank_dropout_scale":false,"decompose_both":true,"decompose_factor":-1,"use_effective_conv2d":false,"init_weights":true}})json";
  EXPECT_EQ(peft::dump_peft_config(peft::parse_peft_config(text)), text);
  auto error_of = [](const std::string& params) {
    try {
      peft::parse_peft_config(R"({"kind":"lokr","module_name_pattern":"x","params":)" + params + "}");
    } catch (const peft::ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(error_of(R"({"r":4})"), HasSubstr("params.alpha"));
  EXPECT_THAT(error_of(R"({"r":4,"alpha":2,"rank_dropout":1})"), HasSubstr("params.rank_dropout: must be in [0, 1)"));
  EXPECT_THAT(error_of(R"({"r":4,"alpha":2,"decompose_factor":"2"})"), HasSubstr("params.decompose_factor"));
  EXPECT_THAT(error_of(R"({"r":4,"alpha":2,"init_weights":"zeros"})"),
              HasSubstr("params.init_weights: expected true, false or \"lycoris\""));
  EXPECT_THAT(error_of(R"({"r":4,"alpha":2,"dropout":0.1})"), HasSubstr("dropout"));
  const auto lycoris = peft::parse_peft_config(
      R"({"kind":"lokr","module_name_pattern":"x","params":{"r":4,"alpha":2,"init_weights":"lycoris"}})");
  EXPECT_EQ(lycoris.get<peft::LoKrConfig>().params.init_weights(), peft::LoKrInit::kLycoris);
  EXPECT_THAT(peft::dump_peft_config(lycoris), HasSubstr(R"("init_weights":"lycoris")"));
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
  auto* down = model->named_modules()["layers.0.mlp.down_proj"]->as<peft::LoKrLinearImpl>();
  ASSERT_NE(down, nullptr);
  EXPECT_TRUE(down->lokr_w1_a.requires_grad()) << "r 1 with decompose_both factors w1 [4, 5]";
  EXPECT_LE(max_diff(model->forward(ids), plain), 1e-6) << "fresh LoRA and LoKr are no-ops";
}
