// Hugging Face PEFT adapters: the fixtures written by PEFT 0.21 load, compute
// and merge to PEFT's numbers; saving writes what PEFT reads.
#include "test_util.h"
#include "toy_model.h"

#include <d9d/peft.h>

#include <torch/nn/functional/loss.h>
#include <torch/optim/sgd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::HasSubstr;
using namespace d9d_test;

namespace {

toy::Toy base_model() {
  toy::Toy model;
  ms::load_model_state(kToy + "/model.safetensors", *ms::identity_mapper_from_module(*model), *model, quiet());
  model->eval();
  return model;
}

at::Tensor input_ids() { return ms::SafetensorsFile::open(kToy + "/inputs.safetensors")->get("input_ids"); }

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

std::string config_error(const std::string& patch_json) {
  std::ifstream in(kToy + "/adapters/lora_attn_r4/adapter_config.json");
  auto j = nlohmann::json::parse(in);
  j.merge_patch(nlohmann::json::parse(patch_json));
  try {
    peft::hf::parse_lora_config(j, "adapter_config.json");
  } catch (const peft::ConfigError& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

class FixtureAdapter : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureAdapter, LogitsAndMergedWeightsMatchPeft) {
  const std::string dir = kToy + "/adapters/" + GetParam();
  auto expected = ms::SafetensorsFile::open(dir + "/expected.safetensors");
  toy::Toy model = base_model();
  auto adapter = peft::hf::load_adapter(*model, dir);
  torch::NoGradGuard g;
  EXPECT_LE(max_diff(model->forward(input_ids()), expected->get("logits")), 1e-5);

  peft::merge_peft(*adapter, model);
  const auto state = ms::module_state_dict(*model);
  size_t merged = 0;
  for (const auto& key : expected->keys()) {
    if (key.rfind("merged.", 0) != 0) continue;
    ++merged;
    EXPECT_LE(max_diff(state.at(key.substr(7)), expected->get(key)), 1e-5) << key;
  }
  EXPECT_GT(merged, 0u);
  EXPECT_EQ(state.size(), 24u) << "merging restores the original keys";
  EXPECT_LE(max_diff(model->forward(input_ids()), expected->get("merged_logits")), 1e-5);
}

TEST_P(FixtureAdapter, SaveThenLoadRoundTrips) {
  const std::string dir = kToy + "/adapters/" + GetParam();
  toy::Toy model = base_model();
  peft::hf::load_adapter(*model, dir);
  TempDir out;
  peft::hf::save_adapter(*model, out.str());

  auto original = ms::SafetensorsFile::open(dir + "/adapter_model.safetensors");
  auto saved = ms::SafetensorsFile::open(out.str() + "/adapter_model.safetensors");
  EXPECT_EQ(saved->keys(), original->keys());
  for (const auto& key : original->keys()) EXPECT_TRUE(torch::equal(saved->get(key), original->get(key))) << key;
  EXPECT_EQ(saved->header().metadata, (std::map<std::string, std::string>{{"format", "pt"}}));

  std::ifstream a(dir + "/adapter_config.json"), b(out.str() + "/adapter_config.json");
  auto ca = peft::hf::parse_lora_config(nlohmann::json::parse(a), "original");
  auto cb = peft::hf::parse_lora_config(nlohmann::json::parse(b), "saved");
  EXPECT_EQ(cb.use_dora, ca.use_dora);
  EXPECT_EQ(cb.use_rslora, ca.use_rslora);
  for (const auto& item : ms::module_state_dict(*model)) {
    const auto name = item.first.substr(0, item.first.rfind('.'));
    const auto sa = ca.select(name), sb = cb.select(name);
    ASSERT_EQ(sa.has_value(), sb.has_value()) << name;
    if (sa) {
      EXPECT_EQ(sa->r(), sb->r()) << name;
      EXPECT_DOUBLE_EQ(sa->scale(), sb->scale()) << name;
    }
  }

  toy::Toy again = base_model();
  peft::hf::load_adapter(*again, out.str());
  torch::NoGradGuard g;
  EXPECT_TRUE(torch::equal(again->forward(input_ids()), model->forward(input_ids())));
}

INSTANTIATE_TEST_SUITE_P(Peft021, FixtureAdapter, ::testing::ValuesIn(kAdapters));

TEST(HfAdapter, RankAndAlphaPatternsFollowPeftsMatchingRule) {
  auto config = peft::hf::parse_lora_config(
      nlohmann::json::parse(R"({"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"],
                                "rank_pattern":{"layers.1.attention.q_proj":2,"v_proj":4},
                                "alpha_pattern":{"q_proj":3}})"),
      "cfg");
  EXPECT_EQ(config.select("layers.1.attention.q_proj")->r(), 2);
  EXPECT_EQ(config.select("layers.0.attention.q_proj")->r(), 8);
  EXPECT_EQ(config.select("layers.0.attention.v_proj")->r(), 4);
  EXPECT_DOUBLE_EQ(config.select("layers.0.attention.q_proj")->alpha(), 3.0);
  EXPECT_DOUBLE_EQ(config.select("layers.0.attention.v_proj")->alpha(), 16.0);
  EXPECT_FALSE(config.select("layers.0.attention.k_proj").has_value());
  EXPECT_FALSE(config.select("layers.0.attention.xq_proj").has_value()) << "suffixes match whole dotted parts";

  toy::Toy model = base_model();
  peft::hf::HfLoRA method(config);
  peft::inject_peft_and_freeze(method, model);
  auto q1 = model->layers[1]->as<toy::LayerImpl>()->attention->named_children()["q_proj"]->as<peft::LoRALinearImpl>();
  ASSERT_NE(q1, nullptr);
  EXPECT_EQ(q1->lora_A->weight.size(0), 2);
  EXPECT_DOUBLE_EQ(q1->scale(), 3.0 / 2.0);
}

TEST(HfAdapter, DumpedConfigsReadBackWhateverTheAlpha) {
  for (const double alpha : {16.0, 0.5, 9007199254740992.0, 1e19, 1e300}) {
    peft::hf::LoraConfig config;
    config.target_modules.names = {"q_proj"};
    config.lora_alpha = alpha;
    const std::string text = peft::hf::dump_lora_config(config);
    EXPECT_EQ(peft::hf::parse_lora_config(nlohmann::json::parse(text), "dumped").lora_alpha, alpha) << text;
  }
  EXPECT_THAT(peft::hf::dump_lora_config(peft::hf::LoraConfig{}), HasSubstr("\"lora_alpha\": 8,"));
}

TEST(HfAdapter, ExcludeModulesAndRegexTargets) {
  auto config = peft::hf::parse_lora_config(
      nlohmann::json::parse(R"({"target_modules":".*_proj","exclude_modules":["o_proj","down_proj"]})"), "cfg");
  EXPECT_TRUE(config.select("layers.0.attention.q_proj").has_value());
  EXPECT_FALSE(config.select("layers.0.attention.o_proj").has_value());
  EXPECT_FALSE(config.select("layers.0.mlp.down_proj").has_value());
  EXPECT_FALSE(config.select("lm_head").has_value());
}

TEST(HfAdapter, UnsupportedFieldsAreErrorsNamingFieldAndValue) {
  EXPECT_EQ(config_error("{}"), "<no error>");
  EXPECT_THAT(config_error(R"({"fan_in_fan_out":true})"),
              HasSubstr("adapter_config.json: fan_in_fan_out: true is not supported by d9d-peft"));
  EXPECT_THAT(config_error(R"({"bias":"all"})"), HasSubstr("bias: \"all\" is not supported by d9d-peft (only \"none\" is)"));
  EXPECT_THAT(config_error(R"({"modules_to_save":["lm_head"]})"),
              HasSubstr("modules_to_save: [\"lm_head\"] is not supported"));
  EXPECT_THAT(config_error(R"({"init_lora_weights":"corda"})"),
              HasSubstr("init_lora_weights: \"corda\" is not supported (supported: true, false, \"gaussian\", \"pissa\", \"pissa_niter_<n>\", \"olora\")"));
  EXPECT_THAT(config_error(R"({"peft_type":"IA3"})"), HasSubstr("peft_type: \"IA3\" is not supported"));
  EXPECT_THAT(config_error(R"({"layers_to_transform":[0]})"), HasSubstr("layers_to_transform: [0] is not supported"));
  EXPECT_THAT(config_error(R"({"some_future_option":3})"),
              HasSubstr("some_future_option: 3 is not supported: d9d-peft does not know this field"));
  EXPECT_EQ(config_error(R"({"some_future_option":null})"), "<no error>");
  EXPECT_THAT(config_error(R"({"r":0})"), HasSubstr("r: must be an integer >= 1, got 0"));
  EXPECT_THAT(config_error(R"({"target_modules":null})"), HasSubstr("target_modules: must name the modules to adapt"));
}

TEST(HfAdapter, AllLinearShorthandIsAnErrorThatSaysWhatToWriteInstead) {
  // PEFT resolves "all-linear" (any case) against the Python model: every
  // Linear but the output layer, which only the model class names.
  for (const char* value : {"all-linear", "ALL-LINEAR", "All-Linear"}) {
    const std::string message = config_error(std::string(R"({"target_modules":")") + value + "\"}");
    EXPECT_THAT(message, HasSubstr(std::string("adapter_config.json: target_modules: \"") + value +
                                   "\" is PEFT's shorthand for every linear layer except the model's output layer"));
    EXPECT_THAT(message, HasSubstr("list the module names explicitly"));
  }
  // As a regex that merely contains the words, it is a regex.
  EXPECT_EQ(config_error(R"({"target_modules":".*all-linear.*"})"), "<no error>");
  // IA3 reads the same field the same way.
  nlohmann::json ia3 = {{"peft_type", "IA3"}, {"target_modules", "all-linear"}, {"feedforward_modules", nullptr}};
  EXPECT_THAT([&] { peft::hf::parse_ia3_config(ia3, "ia3/adapter_config.json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(
                  HasSubstr("ia3/adapter_config.json: target_modules: \"all-linear\" is PEFT's shorthand")));
}

TEST(HfAdapter, WrongBaseModelIsAnErrorNamingTheKeyAndLeavesTheModelAlone) {
  toy::ToyConfig other;
  other.d = 8;
  toy::Toy model(other);
  EXPECT_THAT([&] { peft::hf::load_adapter(*model, kToy + "/adapters/lora_attn_r4"); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr(
                  "shapes differ (wrong base model?): base_model.model.layers.0.attention.q_proj.lora_A.weight: "
                  "file [4, 16], model [4, 8]")));
  EXPECT_EQ(model->named_parameters().size(), 24u) << "a failed load must leave no adapter behind";
  EXPECT_NE(model->layers[0]->as<toy::LayerImpl>()->attention->named_children()["q_proj"]->as<d9d::nn::LinearImpl>(),
            nullptr);
}

TEST(HfAdapter, MissingFilesAndTakenAdapterNamesAreErrors) {
  toy::Toy model = base_model();
  EXPECT_THAT([&] { peft::hf::load_adapter(*model, "/nonexistent/adapter"); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("/nonexistent/adapter: no adapter_config.json")));
  peft::hf::load_adapter(*model, kToy + "/adapters/lora_attn_r4");
  EXPECT_THAT([&] { peft::hf::load_adapter(*model, kToy + "/adapters/lora_rslora"); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("the model already holds an adapter \"default\"")));
}

TEST(HfAdapter, StateDictKeysArePefts) {
  toy::Toy model = base_model();
  peft::hf::load_adapter(*model, kToy + "/adapters/dora_mlp");
  const auto state = peft::hf::get_peft_model_state_dict(*model);
  EXPECT_EQ(state.count("base_model.model.layers.0.mlp.up_proj.lora_magnitude_vector"), 1u);
  EXPECT_EQ(state.count("base_model.model.layers.0.mlp.up_proj.lora_A.weight"), 1u);
  EXPECT_EQ(state.size(), 12u);
  // Keys without the prefix load too.
  ms::StateDict bare;
  for (const auto& [k, v] : state) bare.emplace(k.substr(peft::hf::kPeftKeyPrefix.size()), v.clone());
  EXPECT_NO_THROW(peft::hf::set_peft_model_state_dict(*model, bare));
}

TEST(HfAdapter, SavedAdaptersLoadBackToTheSameLogits) {
  // Every fixture adapter re-saved, and one trained here, must load back to the
  // logits this library computed before saving. (Whether real PEFT reads them
  // the same way is checked by tests/peft_reference/.)
  TempDir temp;
  const fs::path root = temp.path;
  auto export_one = [&](toy::Toy& model, const std::string& name) {
    const fs::path dir = root / name;
    peft::hf::save_adapter(*model, dir.string());
    torch::NoGradGuard g;
    const auto logits = model->forward(input_ids());
    toy::Toy again = base_model();
    peft::hf::load_adapter(*again, dir.string());
    EXPECT_LE(max_diff(again->forward(input_ids()), logits), 1e-6) << name;
  };
  for (const auto& name : kAdapters) {
    toy::Toy model = base_model();
    peft::hf::load_adapter(*model, kToy + "/adapters/" + name);
    export_one(model, "resaved_" + name);
  }
  // An adapter trained by C++: LoRA on every projection, a few SGD steps.
  toy::Toy model = base_model();
  peft::LoRA lora({R"(.*_proj)", peft::LoRAParameters().r(4).alpha(8)});
  peft::inject_peft_and_freeze(lora, model);
  torch::optim::SGD opt(peft::trainable_parameters(*model), torch::optim::SGDOptions(0.5));
  const auto ids = input_ids();
  for (int step = 0; step < 20; ++step) {
    opt.zero_grad();
    auto logits = model->forward(ids.slice(1, 0, -1));
    auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, 37}), ids.slice(1, 1).reshape({-1}));
    loss.backward();
    opt.step();
  }
  export_one(model, "trained_by_cpp");
}

TEST(HfAdapter, DoraOnAnEmbeddingScalesEachDimensionByItsMagnitude) {
  // PEFT's DoRA on an embedding, written out: with ΔW = s·(B A)ᵀ ([V, d]),
  // out = m / ‖W + ΔW‖₀ ⊙ (W + ΔW)[ids], the norm taken over the vocabulary for
  // each embedding dimension; merging folds exactly that into W.
  toy::Toy model = base_model();
  peft::hf::LoraConfig config;
  config.r = 3;
  config.lora_alpha = 5;
  config.use_dora = true;
  config.init = peft::LoRAInit::Random;
  config.target_modules.names = {"embed_tokens"};
  auto adapter = peft::hf::add_adapter(*model, "default", config);
  model->eval();
  auto* layer = model->named_modules()["embed_tokens"]->as<peft::LoRAEmbeddingImpl>();
  ASSERT_NE(layer, nullptr);
  ASSERT_TRUE(layer->lora_magnitude_vector.defined());
  EXPECT_EQ(layer->lora_magnitude_vector.sizes(), (std::vector<int64_t>{16}));
  {
    torch::NoGradGuard g;
    layer->lora_magnitude_vector.mul_(1.0 + 0.3 * torch::rand({16}));  // away from the initial norm
  }
  const at::Tensor w = layer->base->weight.detach().clone();
  const at::Tensor delta = (5.0 / 3.0) * layer->lora_embedding_B.mm(layer->lora_embedding_A).t().detach();
  const at::Tensor weight = w + delta;
  const at::Tensor expected = (layer->lora_magnitude_vector.detach() / weight.norm(2, {0})) * weight;
  const auto ids = input_ids();
  torch::NoGradGuard g;
  EXPECT_LE(max_diff(layer->forward(ids), at::embedding(expected, ids)), 1e-5);
  const auto logits = model->forward(ids);
  peft::merge_peft(*adapter, model);
  EXPECT_LE(max_diff(model->embed_tokens->weight, expected), 1e-5);
  EXPECT_LE(max_diff(model->forward(ids), logits), 1e-5);
}

namespace {

/// What merging `adapter` into `model` throws (a PeftError), checking that
/// the refused merge leaves every tensor of the model bit for bit as it was.
std::string refused_merge(toy::Toy& model, peft::PeftMethodBase& adapter) {
  std::map<std::string, at::Tensor> before;
  for (const auto& [key, tensor] : ms::module_state_dict(*model)) before.emplace(key, tensor.clone());
  std::string message = "<no error>";
  try {
    peft::merge_peft(adapter, *model);
  } catch (const peft::PeftError& e) {
    message = e.what();
  }
  const auto after = ms::module_state_dict(*model);
  EXPECT_EQ(before.size(), after.size());
  for (const auto& [key, tensor] : before) {
    if (!after.count(key)) {
      ADD_FAILURE() << key << " is gone";
      continue;
    }
    EXPECT_TRUE(torch::equal(tensor.nan_to_num(), after.at(key).nan_to_num())) << key;  // NaN equals NaN here
  }
  return message;
}

}  // namespace

TEST(HfAdapter, MergingAnAdapterHoldingNanIsRefusedAndChangesNothing) {
  toy::Toy model = base_model();
  auto adapter = peft::hf::load_adapter(*model, kToy + "/adapters/lora_all_linear_r8");
  auto* v_proj = model->named_modules()["layers.1.attention.v_proj"]->as<peft::LoRALinearImpl>();
  ASSERT_NE(v_proj, nullptr);
  {
    torch::NoGradGuard g;
    v_proj->lora_B->weight.view(-1)[5] = std::numeric_limits<float>::quiet_NaN();
  }
  const std::string message = refused_merge(model, *adapter);
  EXPECT_THAT(message, HasSubstr("of 'layers.1.attention.v_proj' holds 1 NaN or Inf value in lora_B.weight"));
  EXPECT_THAT(message, HasSubstr("Nothing was merged"));
}

TEST(HfAdapter, AMergeThatOverflowsIsRefusedExactlyRestoringTheModelUnlessAllowed) {
  toy::Toy model = base_model();
  auto adapter = peft::hf::load_adapter(*model, kToy + "/adapters/lora_all_linear_r8");
  auto* v_proj = model->named_modules()["layers.1.attention.v_proj"]->as<peft::LoRALinearImpl>();
  ASSERT_NE(v_proj, nullptr);
  {
    // Finite adapter weights whose product exceeds float32's range.
    torch::NoGradGuard g;
    v_proj->lora_A->weight.fill_(1e20f);
    v_proj->lora_B->weight.fill_(1e20f);
  }
  // Bit for bit as before: the trial merge's unmerge rounding does not stay.
  const std::string message = refused_merge(model, *adapter);
  EXPECT_THAT(message, HasSubstr("merging adapter \"default\" into 'layers.1.attention.v_proj' overflows "));
  EXPECT_THAT(message, HasSubstr("Float"));
  EXPECT_THAT(message, HasSubstr("Nothing was merged"));
  EXPECT_THAT(message, HasSubstr("AllowNonFiniteMerge"));
  EXPECT_FALSE(v_proj->merged_adapters().size());

  // Asked for, the merge happens and the overflow is in the weight.
  {
    peft::AllowNonFiniteMerge allow;
    EXPECT_TRUE(peft::AllowNonFiniteMerge::enabled());
    peft::merge_peft(*adapter, model);
  }
  EXPECT_FALSE(peft::AllowNonFiniteMerge::enabled());
  const at::Tensor merged = model->named_parameters()["layers.1.attention.v_proj.weight"];
  EXPECT_GT(merged.numel() - at::isfinite(merged).sum().item<int64_t>(), 0);
}
