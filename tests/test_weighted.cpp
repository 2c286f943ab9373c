// Combining LoRA adapters (add_weighted_adapter, d9d-peft combine): PEFT's
// own combined adapters (fixtures/hf_peft/toy/weighted, written by PEFT 0.21
// from mixed_batch/a and /b), direct formulas for the pruning types, and the
// errors, each leaving the model as it was. tests/peft_reference/ checks
// every type against real PEFT on every run.
#include "test_util.h"
#include "toy_model.h"
#include "toy_moe.h"

#include <d9d/peft.h>

#include <ATen/CPUGeneratorImpl.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;
using namespace d9d_test;

namespace {

const std::string kMixed = kToy + "/mixed_batch";
const std::string kWeighted = kToy + "/weighted";

toy::Toy base_model() {
  toy::Toy model;
  ms::load_model_state(kToy + "/model.safetensors", *ms::identity_mapper_from_module(*model), *model, quiet());
  model->eval();
  return model;
}

/// The toy model with PEFT's mixed_batch adapters as "a" and "b" (b uses rsLoRA).
toy::Toy two_adapters() {
  toy::Toy model = base_model();
  peft::hf::load_adapter(*model, kMixed + "/a", "a");
  peft::hf::load_adapter(*model, kMixed + "/b", "b");
  return model;
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

/// scale * B @ A of every module of an adapter directory, by module path;
/// the scale from its adapter_config.json.
std::map<std::string, at::Tensor> file_deltas(const std::string& dir) {
  const auto files = peft::hf::read_adapter_files(dir);
  const auto config = peft::hf::parse_lora_config(files.config, files.config_path);
  std::map<std::string, at::Tensor> out;
  for (const auto& path : peft::hf::adapted_module_paths(files.tensors, dir)) {
    const std::string p = peft::hf::kPeftKeyPrefix + path;
    const double scale = config.select(path)->scale();
    if (files.tensors.count(p + ".lora_A.weight")) {
      out[path] = scale * at::matmul(files.tensors.at(p + ".lora_B.weight"), files.tensors.at(p + ".lora_A.weight"));
    } else {  // an embedding's delta, laid out as B @ A: [d, V]
      out[path] = scale * at::matmul(files.tensors.at(p + ".lora_embedding_B"), files.tensors.at(p + ".lora_embedding_A"));
    }
  }
  return out;
}

/// scale * B @ A of adapter `name` on every layer holding it (embeddings as [d, V]).
std::map<std::string, at::Tensor> model_deltas(const torch::nn::Module& model, const std::string& name) {
  std::map<std::string, at::Tensor> out;
  for (const auto& e : peft::adapter_layers(model)) {
    if (!e.layer->has_adapter(name)) continue;
    at::Tensor d = e.layer->delta_weight(name);
    out[e.name] = e.module->as<peft::LoRAEmbeddingImpl>() ? d.t() : d;
  }
  return out;
}

/// Every tensor of the model's state, cloned: what "unchanged" is checked against.
ms::StateDict snapshot(const torch::nn::Module& model) {
  ms::StateDict out;
  for (const auto& [k, v] : ms::module_state_dict(model)) out.emplace(k, v.clone());
  return out;
}

void expect_unchanged(const torch::nn::Module& model, const ms::StateDict& before,
                      const std::vector<std::string>& names) {
  EXPECT_EQ(peft::adapter_names(model), names);
  const auto now = ms::module_state_dict(model);
  ASSERT_EQ(now.size(), before.size()) << "tensors were added or removed";
  for (const auto& [k, v] : before) {
    ASSERT_TRUE(now.count(k)) << k;
    EXPECT_TRUE(now.at(k).equal(v)) << k << " changed";
  }
}

std::string read_text(const std::string& path) { return read_bytes(path); }

}  // namespace

// ------------------------------------------------ PEFT's combined adapters

class WeightedFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(WeightedFixture, InModelMatchesPeftsCombinedAdapter) {
  const std::string type = GetParam();
  const std::string dir = kWeighted + "/" + type;
  std::ifstream in(dir + "/recipe.json");
  const auto recipe = nlohmann::json::parse(in);
  ASSERT_EQ(recipe.at("adapters"), nlohmann::json({"a", "b"}));
  auto options = peft::WeightedAdapterOptions().combination_type(recipe.at("combination_type").get<std::string>());
  if (recipe.contains("svd_rank")) options.svd_rank(recipe.at("svd_rank").get<int64_t>());

  toy::Toy model = two_adapters();
  peft::add_weighted_adapter(*model, {"a", "b"}, recipe.at("weights").get<std::vector<double>>(), "w", options);
  EXPECT_EQ(peft::adapter_names(*model), (std::vector<std::string>{"a", "b", "w"}));
  EXPECT_EQ(peft::active_adapters(*model), (std::vector<std::string>{"a"})) << "PEFT adds it inactive";

  // The deltas (SVD factors are unique only up to sign: compare B @ A).
  const auto peft_deltas = file_deltas(dir + "/w_" + type);
  const auto ours = model_deltas(*model, "w");
  ASSERT_EQ(ours.size(), peft_deltas.size());
  double worst = 0;
  for (const auto& [path, delta] : peft_deltas) {
    ASSERT_TRUE(ours.count(path)) << path;
    worst = std::max(worst, max_diff(ours.at(path), delta));
  }
  EXPECT_LE(worst, 1e-5) << type << ": max |delta - PEFT's delta|";

  // PEFT's logits with the combined adapter active.
  const auto expected = ms::SafetensorsFile::open(dir + "/expected.safetensors");
  peft::set_adapter(*model, "w");
  torch::NoGradGuard no_grad;
  EXPECT_LE(max_diff(model->forward(expected->get("input_ids")), expected->get("logits")), 1e-5) << type;

  // Saved, its config has PEFT's r and lora_alpha.
  TempDir tmp;
  peft::hf::SaveAdapterOptions save;
  save.adapter_name = "w";
  peft::hf::save_adapter(*model, tmp / "w", save);
  const auto ours_config = nlohmann::json::parse(read_text(tmp / "w/adapter_config.json"));
  const auto peft_config = nlohmann::json::parse(read_text(dir + "/w_" + type + "/adapter_config.json"));
  EXPECT_EQ(ours_config.at("r"), peft_config.at("r")) << type;
  EXPECT_EQ(ours_config.at("lora_alpha"), peft_config.at("lora_alpha")) << type;
  EXPECT_EQ(ours_config.at("use_rslora"), peft_config.at("use_rslora")) << type;
}

TEST_P(WeightedFixture, OfflineCombineMatchesPeftsCombinedAdapter) {
  const std::string type = GetParam();
  const std::string dir = kWeighted + "/" + type;
  std::ifstream in(dir + "/recipe.json");
  const auto recipe = nlohmann::json::parse(in);
  auto options = peft::WeightedAdapterOptions().combination_type(recipe.at("combination_type").get<std::string>());
  if (recipe.contains("svd_rank")) options.svd_rank(recipe.at("svd_rank").get<int64_t>());
  TempDir tmp;
  const auto result = peft::hf::combine_adapter_dirs({kMixed + "/a", kMixed + "/b"},
                                                     recipe.at("weights").get<std::vector<double>>(), tmp / "out",
                                                     options);
  const auto peft_config = nlohmann::json::parse(read_text(dir + "/w_" + type + "/adapter_config.json"));
  EXPECT_EQ(result.rank, peft_config.at("r").get<int64_t>());
  const auto ours_config = nlohmann::json::parse(read_text(tmp / "out/adapter_config.json"));
  for (const char* field : {"r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern"}) {
    EXPECT_EQ(ours_config.at(field), peft_config.at(field)) << type << ": " << field;
  }
  const auto peft_deltas = file_deltas(dir + "/w_" + type);
  const auto ours = file_deltas(tmp / "out");
  ASSERT_EQ(ours.size(), peft_deltas.size());
  for (const auto& [path, delta] : peft_deltas) EXPECT_LE(max_diff(ours.at(path), delta), 1e-5) << type << " " << path;
}

INSTANTIATE_TEST_SUITE_P(Weighted, WeightedFixture, ::testing::Values("cat", "linear", "svd"));

// ------------------------------------------------------- direct formulas

namespace {

peft::lora::WeightedInput input(std::vector<float> a, std::vector<float> b, double scale, double weight) {
  // A 1x4 (r = 1, in = 4), B 2x1.
  return {at::tensor(a).view({1, 4}), at::tensor(b).view({2, 1}), scale, weight};
}

}  // namespace

TEST(Weighted, TiesElectsTheSignAndAveragesTheAgreeingEntries) {
  // Two rank-1 adapters, scale 1, weights 1 and 4: A's side weights sqrt(1) = 1 and sqrt(4) = 2.
  const auto x = input({1, -2, 3, -0.5}, {1, 1}, 1.0, 1.0);
  const auto y = input({-3, -1, 0.5, 4}, {1, 1}, 1.0, 4.0);
  peft::lora::WeightedPlan plan{"ties", 1};
  // density 1 prunes nothing; "total": the sign of the sum of the unweighted entries.
  auto options = peft::WeightedAdapterOptions().density(1.0).majority_sign_method("total");
  at::Tensor a = peft::lora::combine_weighted({x, y}, plan, options).first;
  // col 0: 1 + -3 = -2 -> "-": only y, weighted -6, one kept -> -6.
  // col 1: both "-": (-2*1 + -1*2) / 2 = -2.  col 2: "+": (3 + 1) / 2 = 2.  col 3: 3.5 "+": y alone, 8.
  EXPECT_TRUE(a.allclose(at::tensor({-6.f, -2.f, 2.f, 8.f}).view({1, 4}))) << a;

  // "frequency": the sign more entries have; a tie (one each) elects "+".
  options.majority_sign_method("frequency");
  a = peft::lora::combine_weighted({x, y}, plan, options).first;
  // col 0: +,- -> "+": x alone, 1.  col 1: "-": -2.  col 2: "+": 2.  col 3: -,+ -> "+": 8.
  EXPECT_TRUE(a.allclose(at::tensor({1.f, -2.f, 2.f, 8.f}).view({1, 4}))) << a;
}

TEST(Weighted, MagnitudePruneKeepsTheLargestEntriesOfEachAdapter) {
  const auto x = input({1, -2, 3, -0.5}, {1, 1}, 1.0, 1.0);
  const auto y = input({-3, -1, 0.5, 4}, {1, 1}, 1.0, 4.0);
  peft::lora::WeightedPlan plan{"magnitude_prune", 1};
  // density 0.5 keeps int(0.5 * 4) = 2 entries of each A (and 1 of each B).
  const auto ab = peft::lora::combine_weighted({x, y}, plan, peft::WeightedAdapterOptions().density(0.5));
  // x keeps -2 and 3; y keeps -3 and 4 (times 2).
  EXPECT_TRUE(ab.first.allclose(at::tensor({-6.f, -2.f, 3.f, 8.f}).view({1, 4}))) << ab.first;
}

TEST(Weighted, DareKeepsAFractionRescaledAndIsReproducibleFromAGenerator) {
  // One large adapter, so the kept fraction shows: every entry of the result
  // is 0 or the input / density (times the A-side weight sqrt(2 * 0.5) = 1).
  const at::Tensor a = at::randn({64, 256});
  const at::Tensor b = at::randn({128, 64});
  peft::lora::WeightedPlan plan{"dare_linear", 64};
  const double density = 0.3;
  auto options = peft::WeightedAdapterOptions().density(density).generator(at::make_generator<at::CPUGeneratorImpl>(7));
  const auto ab = peft::lora::combine_weighted({{a, b, 0.5, 2.0}}, plan, options);
  const at::Tensor kept = ab.first != 0;
  const double fraction = kept.to(at::kDouble).mean().item<double>();
  EXPECT_NEAR(fraction, density, 0.01) << "16384 Bernoulli(0.3) draws";
  EXPECT_TRUE(ab.first.masked_select(kept).allclose(a.masked_select(kept) / density));
  const at::Tensor b_kept = ab.second != 0;
  EXPECT_TRUE(ab.second.masked_select(b_kept).allclose(b.masked_select(b_kept) / density));

  options.generator(at::make_generator<at::CPUGeneratorImpl>(7));
  EXPECT_TRUE(peft::lora::combine_weighted({{a, b, 0.5, 2.0}}, plan, options).first.equal(ab.first));
  options.generator(at::make_generator<at::CPUGeneratorImpl>(8));
  EXPECT_FALSE(peft::lora::combine_weighted({{a, b, 0.5, 2.0}}, plan, options).first.equal(ab.first));
}

TEST(Weighted, EmbeddingAndLinearLayersOfOneAdapterTwiceAddUp) {
  // The same adapter under two names: cat and svd give (w1 + w2) * delta
  // exactly; linear gives (sqrt(w1) + sqrt(w2))^2 * delta. Embeddings included.
  toy::Toy model = base_model();
  peft::hf::load_adapter(*model, kToy + "/adapters/lora_embed_head", "x");
  peft::hf::load_adapter(*model, kToy + "/adapters/lora_embed_head", "y");
  const auto original = model_deltas(*model, "x");
  ASSERT_TRUE(original.count("embed_tokens"));
  peft::add_weighted_adapter(*model, {"x", "y"}, {0.25, 1.0}, "cat",
                             peft::WeightedAdapterOptions().combination_type("cat"));
  peft::add_weighted_adapter(*model, {"x", "y"}, {0.25, 1.0}, "svd", peft::WeightedAdapterOptions());
  peft::add_weighted_adapter(*model, {"x", "y"}, {0.25, 1.0}, "lin",
                             peft::WeightedAdapterOptions().combination_type("linear"));
  for (const auto& [path, delta] : original) {
    EXPECT_LE(max_diff(model_deltas(*model, "cat").at(path), 1.25 * delta), 1e-5) << path;
    EXPECT_LE(max_diff(model_deltas(*model, "svd").at(path), 1.25 * delta), 1e-5) << path;
    EXPECT_LE(max_diff(model_deltas(*model, "lin").at(path), 2.25 * delta), 1e-5) << path;  // (0.5 + 1)^2
  }
}

TEST(Weighted, TheNewAdapterTrainsSavesAndMerges) {
  toy::Toy model = two_adapters();
  peft::add_weighted_adapter(*model, {"a", "b"}, {0.7, 0.5}, "w", peft::WeightedAdapterOptions().combination_type("cat"));
  peft::set_adapter(*model, "w");
  size_t trainable = 0;
  for (const auto& p : model->named_parameters()) trainable += p.value().requires_grad();
  EXPECT_EQ(trainable, 8u) << "A and B of w on four layers";
  const auto ids = ms::SafetensorsFile::open(kWeighted + "/cat/expected.safetensors")->get("input_ids");
  at::Tensor before;
  {
    torch::NoGradGuard g;
    before = model->forward(ids);
  }
  TempDir tmp;
  peft::hf::SaveAdapterOptions save;
  save.adapter_name = "w";
  peft::hf::save_adapter(*model, tmp / "w", save);
  toy::Toy reloaded = base_model();
  peft::hf::load_adapter(*reloaded, tmp / "w");
  torch::NoGradGuard g;
  EXPECT_LE(max_diff(reloaded->forward(ids), before), 1e-6);
  EXPECT_EQ(peft::merge_adapter(
                *model, [](const std::string&) { return true; }, "w"),
            4u);
  peft::set_adapter(*model, "a");
  peft::DisableAdapters off(*model);
  EXPECT_LE(max_diff(model->forward(ids), before), 1e-5) << "merged w into the base";
}

// ----------------------------------------------------------------- errors

namespace {

/// Calls add_weighted_adapter on the two-adapter model, expects a `Error`
/// whose message holds every one of `parts`, and the model unchanged.
template <typename Error>
void expect_refused(const std::vector<std::string>& adapters, const std::vector<double>& weights,
                    const std::string& name, const peft::WeightedAdapterOptions& options,
                    const std::vector<std::string>& parts, toy::Toy model = two_adapters()) {
  const auto names = peft::adapter_names(*model);
  const auto before = snapshot(*model);
  try {
    peft::add_weighted_adapter(*model, adapters, weights, name, options);
    ADD_FAILURE() << "no error; expected one with: " << parts.front();
  } catch (const Error& e) {
    for (const auto& p : parts) EXPECT_THAT(e.what(), HasSubstr(p));
  }
  expect_unchanged(*model, before, names);
}

}  // namespace

TEST(WeightedErrors, UnknownAdapterListsTheKnownOnes) {
  expect_refused<peft::PeftError>({"a", "c"}, {1, 1}, "w", {}, {"no adapter \"c\"", "\"a\", \"b\""});
}

TEST(WeightedErrors, WeightCountMustMatch) {
  expect_refused<peft::PeftError>({"a", "b"}, {1}, "w", {}, {"1 weights for 2 adapters", "one weight per adapter"});
  expect_refused<peft::PeftError>({"a", "b"}, {1, NAN}, "w", {}, {"weight of adapter \"b\" is nan"});
}

TEST(WeightedErrors, TakenOrUnusableName) {
  expect_refused<peft::PeftError>({"a", "b"}, {1, 1}, "b", {}, {"already holds an adapter \"b\"", "delete_adapter"});
  expect_refused<peft::PeftError>({"a", "b"}, {1, 1}, "w.x", {}, {"\"w.x\" is not usable"});
}

TEST(WeightedErrors, OptionsNameTheField) {
  using O = peft::WeightedAdapterOptions;
  expect_refused<peft::ConfigError>({"a", "b"}, {1, 1}, "w", O().combination_type("average"),
                                    {"WeightedAdapterOptions.combination_type", "\"average\"", "dare_ties_svd"});
  for (double d : {0.0, 1.5, -0.1, static_cast<double>(NAN)}) {
    expect_refused<peft::ConfigError>({"a", "b"}, {1, 1}, "w", O().combination_type("ties").density(d),
                                      {"WeightedAdapterOptions.density", "(0, 1]"});
  }
  expect_refused<peft::ConfigError>({"a", "b"}, {1, 1}, "w", O().combination_type("dare_linear"),
                                    {"WeightedAdapterOptions.density", "\"dare_linear\" prunes"});
  expect_refused<peft::ConfigError>({"a", "b"}, {1, 1}, "w",
                                    O().combination_type("ties").density(0.5).majority_sign_method("mean"),
                                    {"WeightedAdapterOptions.majority_sign_method", "\"mean\""});
  expect_refused<peft::ConfigError>({"a", "b"}, {1, 1}, "w", O().svd_clamp(2.0), {"WeightedAdapterOptions.svd_clamp"});
  expect_refused<peft::PeftError>({"a", "b"}, {1, 1}, "w", O().svd_rank(17),
                                  {"'layers.0.attention.q_proj'", "rank 17", "svd_rank <= 16"});
}

TEST(WeightedErrors, DifferentRanksNeedCatOrSvd) {
  toy::Toy model = base_model();
  peft::hf::load_adapter(*model, kToy + "/adapters/lora_attn_r4", "r4");
  peft::hf::load_adapter(*model, kToy + "/adapters/lora_all_linear_r8", "r8");
  expect_refused<peft::PeftError>({"r4", "r8"}, {1, 1}, "w", peft::WeightedAdapterOptions().combination_type("linear"),
                                  {"\"r4\" r=4", "\"r8\" r=8", "\"cat\""}, model);
  // cat and svd take them (cat: r = 4 + 8, zero rows on layers only r8 adapts).
  peft::add_weighted_adapter(*model, {"r4", "r8"}, {1, 1}, "w", peft::WeightedAdapterOptions().combination_type("cat"));
  const auto deltas = model_deltas(*model, "w");
  const auto r8 = model_deltas(*model, "r8");
  EXPECT_LE(max_diff(deltas.at("layers.0.mlp.up_proj"), r8.at("layers.0.mlp.up_proj")), 1e-6);
}

TEST(WeightedErrors, DoraAndNonFiniteInputsAreRefused) {
  toy::Toy model = two_adapters();
  peft::hf::load_adapter(*model, kToy + "/adapters/dora_mlp", "dora");
  expect_refused<peft::PeftError>({"a", "dora"}, {1, 1}, "w", {}, {"adapter \"dora\"", "uses DoRA"}, model);

  toy::Toy broken = two_adapters();
  for (const auto& e : peft::adapter_layers(*broken)) {
    if (e.name != "layers.1.attention.v_proj") continue;
    torch::NoGradGuard g;
    e.layer->adapter_module("b")->named_parameters()["lora_B.weight"][0][0] = INFINITY;
  }
  expect_refused<peft::PeftError>({"a", "b"}, {1, 1}, "w", {},
                                  {"adapter \"b\"", "'layers.1.attention.v_proj.lora_B.weight'", "NaN or Inf"}, broken);
}

TEST(WeightedErrors, OfflineCombineNamesTheDirectory) {
  TempDir tmp;
  EXPECT_THAT([&] { peft::hf::combine_adapter_dirs({kMixed + "/a", kToy + "/adapters/dora_mlp"}, {1, 1}, tmp / "o"); },
              ThrowsMessage<peft::PeftError>(AllOf(HasSubstr("dora_mlp/adapter_config.json"), HasSubstr("use_dora"))));
  EXPECT_THAT([&] { peft::hf::combine_adapter_dirs({kMixed + "/a", kToy + "/tuners/ia3"}, {1, 1}, tmp / "o"); },
              ThrowsMessage<peft::PeftError>(AllOf(HasSubstr("tuners/ia3 holds a IA3 adapter"))));
  EXPECT_THAT(
      [&] {
        peft::hf::combine_adapter_dirs({kMixed + "/a", kToy + "/adapters/lora_all_linear_r8"}, {1, 1}, tmp / "o",
                                       peft::WeightedAdapterOptions().combination_type("ties").density(0.5));
      },
      ThrowsMessage<peft::PeftError>(HasSubstr("lora_all_linear_r8\" r=8")));
  EXPECT_FALSE(fs::exists(tmp / "o")) << "a refused combine writes nothing";
}

TEST(WeightedErrors, GroupedExpertAdaptersAreRefusedByLayer) {
  torch::manual_seed(3);
  toy::ToyMoE model(toy::MoEConfig{});
  peft::LoRA lora({".*experts\\.(gate|up|down)_proj", peft::LoRAParameters().r(4).alpha(8)});
  peft::inject_peft_and_freeze(lora, model);
  const auto before = snapshot(*model);
  const auto names = peft::adapter_names(*model);
  try {
    peft::add_weighted_adapter(*model, {"default"}, {0.5}, "w");
    ADD_FAILURE() << "combined grouped expert adapters";
  } catch (const peft::PeftError& e) {
    EXPECT_THAT(e.what(), HasSubstr("on 'layers.0.moe.experts.gate_proj' adapts grouped expert weights"));
    EXPECT_THAT(e.what(), HasSubstr("Linear and Embedding LoRA layers only"));
  }
  expect_unchanged(*model, before, names);
}
