// OFT's files and method: PEFT's fixture (library merge, offline merge, the
// command line), training, save/load through the registry, NaN refusal, and
// the configs as PEFT and d9d JSON write them. The math and the layer are in
// test_oft.cpp.
#include "test_util.h"
#include "training_check.h"
#include "toy_model.h"

#include <d9d/peft.h>

#include <torch/nn/functional/loss.h>
#include <torch/optim/adamw.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
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

peft::hf::OFTConfig config_of(std::vector<std::string> targets, int64_t block_size = 4) {
  peft::hf::OFTConfig c;
  c.target_modules.names = std::move(targets);
  c.oft_block_size = block_size;
  c.init_weights = false;
  return c;
}

}  // namespace

TEST(OFTFiles, PeftsFixtureGivesPeftsLogitsMergedWeightsAndOfflineMerge) {
  const std::string dir = kToy + "/tuners/oft";
  const auto expected = ms::SafetensorsFile::open(dir + "/expected.safetensors");
  const auto ids = toy_ids();
  toy::Toy model = toy_base();
  auto method = peft::hf::load_adapter(*model, dir);
  EXPECT_NE(dynamic_cast<peft::OFT*>(method.get()), nullptr) << "the registry picked OFT from peft_type";
  torch::NoGradGuard g;
  const auto plain = toy_base()->forward(ids);
  EXPECT_GT(max_diff(expected->get("logits"), plain), 1e-3) << "the fixture's adapter changes the logits";
  const double logits_diff = max_diff(model->forward(ids), expected->get("logits"));
  EXPECT_LE(logits_diff, 1e-5);
  std::printf("OFT fixture: max |logits - PEFT| = %.3g\n", logits_diff);
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
  EXPECT_EQ(merged, 4u);
  EXPECT_THAT([&] {
    peft::hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", dir, out / "scaled", 0.5, ms::no_progress());
  }, ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("cannot be scaled")));

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
  EXPECT_THAT(shown, HasSubstr("OFT"));
  EXPECT_THAT(shown, HasSubstr("base_model.model.layers.1.attention.v_proj.oft_R.weight"));
}

TEST(OFTMethod, TrainingLowersTheLossAndChangesOnlyOFTTensors) {
  toy::Toy model = toy_base();
  const auto ids = toy_ids();
  torch::manual_seed(6);
  auto config = config_of({}, 8);
  config.target_modules.regex = ".*(q|v|down)_proj";
  config.init_weights = true;
  peft::OFT oft(config);
  peft::inject_peft_and_freeze(oft, model);
  const auto trainable = peft::trainable_parameters(*model);
  EXPECT_EQ(trainable.size(), 2u * 3u) << "2 layers x 3 projections, one oft_R each";
  expect_training_changes_only(*model, next_token_loss(model, ids), key_contains(".oft_R."), 1e-2);
  torch::NoGradGuard g;
  const auto unmerged = model->forward(ids);
  peft::merge_peft(oft, model);
  EXPECT_LE(max_diff(model->forward(ids), unmerged), 1e-5);
}

TEST(OFTFiles, SaveThenLoadThroughTheRegistryRoundTrips) {
  const auto ids = toy_ids();
  toy::Toy model = toy_base();
  torch::manual_seed(7);
  auto config = config_of({"v_proj", "up_proj", "down_proj"}, 0);
  config.r = 4;
  config.coft = true;
  config.eps = 0.1;
  config.use_cayley_neumann = false;
  peft::OFT oft(config);
  peft::inject_peft_and_freeze(oft, model);
  TempDir dir;
  peft::hf::save_adapter(*model, dir.str());
  const auto written = nlohmann::json::parse(read_bytes(dir / "adapter_config.json"));
  EXPECT_EQ(written["peft_type"], "OFT");
  EXPECT_EQ(written["r"], 4);
  EXPECT_EQ(written["oft_block_size"], 0);
  EXPECT_EQ(written["coft"], true);
  EXPECT_EQ(written["use_cayley_neumann"], false);
  const auto weights = ms::SafetensorsFile::open(dir / "adapter_model.safetensors");
  EXPECT_EQ(weights->get("base_model.model.layers.0.mlp.down_proj.oft_R.weight").sizes(),
            (std::vector<int64_t>{4, 45})) << "in 40: 4 blocks of 10";
  EXPECT_EQ(weights->get("base_model.model.layers.1.attention.v_proj.oft_R.weight").sizes(),
            (std::vector<int64_t>{4, 6}));

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
}

TEST(OFTMethod, MergeRefusesNaNAndLeavesTheModel) {
  toy::Toy model = toy_base();
  peft::OFT oft(config_of({"q_proj"}));
  peft::inject_peft_and_freeze(oft, model);
  auto* q = model->named_modules()["layers.0.attention.q_proj"]->as<peft::OFTLinearImpl>();
  ASSERT_NE(q, nullptr);
  const auto w = q->base_weight().clone();
  {
    torch::NoGradGuard g;
    q->oft_R->weight[0][0] = NAN;
  }
  EXPECT_THAT([&] { peft::merge_peft(oft, model); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("NaN or Inf")));
  EXPECT_TRUE(torch::equal(q->base_weight(), w));
  EXPECT_NE(model->named_modules()["layers.0.attention.q_proj"]->as<peft::OFTLinearImpl>(), nullptr);
}

TEST(OFTConfig, PeftsFieldsAndErrorsNameTheField) {
  const auto c = peft::hf::parse_oft_config(
      nlohmann::json::parse(read_bytes(kToy + "/tuners/oft/adapter_config.json")), "adapter_config.json");
  EXPECT_EQ(c.r, 0);
  EXPECT_EQ(c.oft_block_size, 4);
  EXPECT_TRUE(c.use_cayley_neumann);
  EXPECT_EQ(c.num_cayley_neumann_terms, 5);
  EXPECT_DOUBLE_EQ(c.eps, 6e-5);
  EXPECT_FALSE(c.init_weights);
  EXPECT_TRUE(c.select("layers.0.attention.v_proj").has_value());
  EXPECT_FALSE(c.select("layers.0.attention.k_proj").has_value());
  auto error_of = [](const std::string& text) {
    try {
      peft::hf::parse_oft_config(nlohmann::json::parse(text), "cfg");
    } catch (const peft::ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"r":4})"),
              HasSubstr("cfg: oft_block_size: exactly one of r and oft_block_size must be non-zero"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"oft_block_size":0})"),
              HasSubstr("cfg: r: exactly one of r and oft_block_size"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"oft_block_size":-2})"),
              HasSubstr("cfg: oft_block_size: must be an integer >= 0"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"num_cayley_neumann_terms":0})"),
              HasSubstr("cfg: num_cayley_neumann_terms: must be an integer >= 1"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"coft":1})"),
              HasSubstr("cfg: coft: expected true or false"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"bias":"all"})"),
              HasSubstr("cfg: bias: \"all\" is not supported"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"fan_in_fan_out":true})"),
              HasSubstr("cfg: fan_in_fan_out: true is not supported"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"layers_to_transform":[0]})"),
              HasSubstr("cfg: layers_to_transform: [0] is not supported"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"modules_to_save":["lm_head"]})"),
              HasSubstr("cfg: modules_to_save: "));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"oft_dropout":0.1})"),
              HasSubstr("cfg: oft_dropout: 0.1 is not supported"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT"})"), HasSubstr("cfg: target_modules: must name the modules"));
  const auto again = peft::hf::parse_oft_config(nlohmann::json::parse(peft::hf::dump_oft_config(c)), "dumped");
  EXPECT_EQ(again.target_modules.names, c.target_modules.names);
  EXPECT_EQ(again.oft_block_size, c.oft_block_size);
  EXPECT_EQ(again.r, c.r);
  EXPECT_EQ(again.eps, c.eps);
  EXPECT_EQ(again.init_weights, c.init_weights);
}

TEST(OFTConfig, D9dJsonParsesDumpsAndStacksWithLora) {
  const std::string text =
      R"json({"kind":"oft","module_name_pattern":".*(k_proj|down_proj)","params":{"r":0,"oft_block_size":4,"coft":false,"eps":6e-05,"block_share":false,"use_cayley_neumann":true,"num_cayley_neumann_terms":5,"module_dropout":0.0,"init_weights":true}})json";
  EXPECT_EQ(peft::dump_peft_config(peft::parse_peft_config(text)), text);
  const auto short_form = peft::parse_peft_config(R"json({"kind":"oft","module_name_pattern":"x","params":{"r":2}})json");
  EXPECT_EQ(short_form.get<peft::OFTConfig>().params.oft_block_size(), 0) << "the one given decides";
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"oft","module_name_pattern":"x","params":{}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.oft_block_size: field required")));
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"oft","module_name_pattern":"x","params":{"r":2,"oft_block_size":4}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.oft_block_size: exactly one of r and oft_block_size")));
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"oft","module_name_pattern":"x","params":{"r":2,"eps":-1}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.eps: must be a finite number >= 0")));
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"oft","module_name_pattern":"x","params":{"r":2,"alpha":2}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("alpha")));
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
  auto* down = model->named_modules()["layers.0.mlp.down_proj"]->as<peft::OFTLinearImpl>();
  ASSERT_NE(down, nullptr);
  EXPECT_TRUE(down->oft_R->weight.requires_grad());
  EXPECT_LE(max_diff(model->forward(ids), plain), 1e-6) << "fresh LoRA and OFT are no-ops";
}
