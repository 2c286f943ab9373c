// VeRA: the layer against PEFT's formulas (sliced shared projections, dropout,
// merge), the projections against the ones PEFT drew, the config as PEFT
// reads and writes it, PEFT's fixture (also without its projections),
// training, and adapter files through the registry. Random PEFT configs both
// ways are in tests/peft_reference (VERA cases).
#include "test_util.h"
#include "training_check.h"
#include "toy_model.h"

#include <d9d/peft.h>
#include <d9d/peft/vera/math.h>

#include <torch/nn/functional/dropout.h>
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

std::string fixture_dir() { return kToy + "/tuners/vera"; }

/// PEFT's ΔW written out as diagonal matrices: diag(λ_b) B[:out, :] diag(λ_d) A[:, :in].
at::Tensor formula(const peft::VeraLinearAdapterImpl& a, int64_t out, int64_t in) {
  return torch::diag(a.vera_lambda_b).mm(a.vera_B.slice(0, 0, out)).mm(torch::diag(a.vera_lambda_d)).mm(
      a.vera_A.slice(1, 0, in));
}

peft::hf::VeraConfig config_of(std::vector<std::string> targets, int64_t r = 4) {
  peft::hf::VeraConfig c;
  c.target_modules.names = std::move(targets);
  c.r = r;
  c.init_weights = false;
  return c;
}

peft::VeraLinearImpl* vera_layer(toy::Toy& model, const std::string& name) {
  return model->named_modules()[name]->as<peft::VeraLinearImpl>();
}

/// A copy of PEFT's fixture adapter with `save_projection` false and without its projections.
void write_fixture_without_projections(const std::string& dir) {
  fs::create_directories(dir);
  auto config = nlohmann::json::parse(read_bytes(fixture_dir() + "/adapter_config.json"));
  config["save_projection"] = false;
  std::ofstream(dir + "/adapter_config.json") << config.dump(2);
  const auto file = ms::SafetensorsFile::open(fixture_dir() + "/adapter_model.safetensors");
  ms::StateDict tensors;
  for (const auto& key : file->keys()) {
    if (key.rfind("base_model.vera_", 0) != 0) tensors.emplace(key, file->get(key));
  }
  ms::save_safetensors(dir + "/adapter_model.safetensors", tensors, {{"format", "pt"}});
}

}  // namespace

TEST(VeraLayer, ForwardIsBasePlusTheSlicedProjectionsScaledByTheVectors) {
  torch::manual_seed(0);
  d9d::nn::Linear base(6, 5);
  const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
  // Projections for a larger layer [9, 7]: this layer uses A[:, :6] and B[:5, :].
  const auto drawn = peft::vera::projections(3, 9, 7, 42);
  const at::Tensor A = drawn.first, B = drawn.second;
  peft::VeraLinearImpl layer(base.ptr(), peft::VeraParameters().r(3).init_weights(false).vera_A(A).vera_B(B));
  EXPECT_TRUE(layer.vera_A.is_same(A)) << "the layer holds the given projections, not a copy";
  EXPECT_EQ(layer.vera_lambda_b.sizes(), (std::vector<int64_t>{5}));
  EXPECT_EQ(layer.vera_lambda_d.sizes(), (std::vector<int64_t>{3}));
  EXPECT_TRUE(torch::equal(layer.vera_lambda_b, torch::ones({5}))) << "PEFT's init_weights=false: λ_b ones";
  torch::NoGradGuard g;
  {
    auto& a = layer.adapter("default");
    a.vera_lambda_b.copy_(torch::randn({5}));  // away from ones so that a swapped λ shows
  }
  const auto x = torch::randn({4, 6});
  const auto delta = formula(layer.adapter("default"), 5, 6);
  EXPECT_GT(delta.abs().max().item<double>(), 1e-3);
  EXPECT_LE(max_diff(layer.delta_weight("default"), delta), 1e-6);
  EXPECT_LE(max_diff(layer.forward(x), x.mm(w.t()) + b + x.mm(delta.t())), 1e-5);
  std::vector<std::string> keys;
  for (const auto& p : layer.named_parameters()) keys.push_back(p.key());
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, (std::vector<std::string>{"base.bias", "base.weight", "vera_lambda_b", "vera_lambda_d"}))
      << "PEFT's per-layer keys; only the vectors are parameters";
  std::vector<std::string> buffers;
  for (const auto& p : layer.named_buffers()) buffers.push_back(p.key());
  EXPECT_EQ(buffers, (std::vector<std::string>{"vera_A.default", "vera_B.default"})) << "PEFT's in-model layout";

  EXPECT_THAT([&] { peft::VeraLinearImpl(d9d::nn::Linear(8, 5).ptr(), peft::VeraParameters().r(3).vera_A(A).vera_B(B)); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("do not fit a layer [5, 8] of rank 3")));
}

TEST(VeraLayer, PeftsDefaultInitIsANoOpWithLambdaBZeroAndLambdaDInitial) {
  torch::manual_seed(1);
  d9d::nn::Linear base(5, 3);
  const auto x = torch::randn({2, 5});
  const auto plain = base->forward(x).detach();
  peft::VeraLinearImpl layer(base.ptr(), peft::VeraParameters().r(4).d_initial(0.25));
  EXPECT_TRUE(torch::equal(layer.vera_lambda_b, torch::zeros({3})));
  EXPECT_TRUE(torch::equal(layer.vera_lambda_d, torch::full({4}, 0.25)));
  // Kaiming-uniform over the fan-in: |A| <= sqrt(6 / in), |B| <= sqrt(6 / r).
  EXPECT_LE(layer.vera_A.abs().max().item<double>(), std::sqrt(6.0 / 5));
  EXPECT_LE(layer.vera_B.abs().max().item<double>(), std::sqrt(6.0 / 4));
  EXPECT_GT(layer.vera_A.abs().max().item<double>(), 0.5 * std::sqrt(6.0 / 5));
  EXPECT_TRUE(torch::equal(layer.forward(x).detach(), plain));
}

TEST(VeraProjections, AreTheOnesPeftDrewForTheFixtureBitForBit) {
  // PEFT 0.21 (PyTorch 2.11) drew these with torch.Generator().manual_seed(0)
  // for r 8 and the toy's 16 x 16 projections, and saved them.
  const auto file = ms::SafetensorsFile::open(fixture_dir() + "/adapter_model.safetensors");
  const auto [A, B] = peft::vera::projections(8, 16, 16, 0);
  EXPECT_TRUE(torch::equal(A, file->get("base_model.vera_A")))
      << "max diff " << max_diff(A, file->get("base_model.vera_A"));
  EXPECT_TRUE(torch::equal(B, file->get("base_model.vera_B")))
      << "max diff " << max_diff(B, file->get("base_model.vera_B"));
  const auto [A1, B1] = peft::vera::projections(8, 16, 16, 1);
  EXPECT_FALSE(torch::equal(A1, A)) << "another key, other projections";
  // Other sizes and keys are checked against PEFT's own draws in tests/peft_reference.
}

TEST(VeraLayer, SeveralAdaptersAddAndMergeRoundTrips) {
  torch::manual_seed(2);
  d9d::nn::Linear base(5, 4);
  const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
  peft::VeraLinearImpl layer(base.ptr(), peft::VeraParameters().r(2).init_weights(false), "a");
  layer.add_adapter("b", peft::VeraParameters().r(3).projection_prng_key(7).init_weights(false));
  layer.set_active_adapters({"a", "b"});
  EXPECT_TRUE(layer.adapter("b").vera_lambda_b.requires_grad());
  EXPECT_FALSE(layer.adapter("b").vera_A.requires_grad());
  EXPECT_EQ(layer.adapter("b").vera_A.sizes(), (std::vector<int64_t>{3, 5}));
  torch::NoGradGuard g;
  const auto x = torch::randn({3, 5});
  const auto da = formula(layer.adapter("a"), 4, 5), db = formula(layer.adapter("b"), 4, 5);
  const auto out = layer.forward(x);
  EXPECT_LE(max_diff(out, x.mm((w + da + db).t()) + b), 1e-5);

  layer.merge_adapter("a");
  EXPECT_LE(max_diff(base->weight, w + da), 1e-6);
  EXPECT_TRUE(torch::equal(base->bias, b)) << "VeRA's merge leaves the bias";
  EXPECT_LE(max_diff(layer.forward(x), out), 1e-5) << "a merged, b still computed";
  EXPECT_THAT([&] { layer.merge_adapter("a"); }, ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("a")));
  layer.unmerge_adapter("a");
  EXPECT_LE(max_diff(base->weight, w), 1e-6);

  layer.set_adapters_enabled(false);
  EXPECT_LE(max_diff(layer.forward(x), x.mm(w.t()) + b), 1e-6) << "disabled: the base alone";
  layer.set_adapters_enabled(true);
  EXPECT_THAT([&] { layer.add_adapter("c", peft::LoHaParameters()); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("takes VeraParameters")));
  EXPECT_THAT([&] { layer.add_adapter("c", peft::VeraParameters().r(0)); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("add_adapter(\"c\").r: must be an integer >= 1")));
  layer.delete_adapter("a");
  EXPECT_TRUE(layer.vera_A.is_same(layer.adapter("b").vera_A)) << "b moved to the top, its projections too";
}

TEST(VeraLayer, TrainModeDropsOutTheAdaptersInputAsPeft) {
  torch::manual_seed(3);
  d9d::nn::Linear base(6, 8);
  const auto w = base->weight.detach().clone(), b = base->bias.detach().clone();
  peft::VeraLinearImpl layer(base.ptr(), peft::VeraParameters().r(4).init_weights(false).vera_dropout(0.5));
  layer.train();
  torch::NoGradGuard g;
  const auto x = torch::randn({3, 6});
  const auto delta = formula(layer.adapter("default"), 8, 6);
  // PEFT: nn.Dropout(p) on x, drawn from the default generator.
  torch::manual_seed(7);
  const auto dropped = torch::nn::functional::dropout(x, torch::nn::functional::DropoutFuncOptions().p(0.5));
  torch::manual_seed(7);
  const auto out = layer.forward(x);
  EXPECT_LE(max_diff(out, x.mm(w.t()) + b + dropped.mm(delta.t())), 1e-5);
  EXPECT_GT(max_diff(out, x.mm((w + delta).t()) + b), 1e-4) << "inputs were dropped";
  layer.eval();
  EXPECT_LE(max_diff(layer.forward(x), x.mm((w + delta).t()) + b), 1e-5) << "no dropout in eval";
}

TEST(VeraFiles, PeftsFixtureGivesPeftsLogitsMergedWeightsAndOfflineMerge) {
  const auto expected = ms::SafetensorsFile::open(fixture_dir() + "/expected.safetensors");
  const auto ids = toy_ids();
  toy::Toy model = toy_base();
  auto method = peft::hf::load_adapter(*model, fixture_dir());
  EXPECT_NE(dynamic_cast<peft::Vera*>(method.get()), nullptr) << "the registry picked VeRA from peft_type";
  auto* q0 = vera_layer(model, "layers.0.attention.q_proj");
  auto* v1 = vera_layer(model, "layers.1.attention.v_proj");
  ASSERT_TRUE(q0 && v1);
  EXPECT_TRUE(q0->vera_A.is_same(v1->vera_A)) << "one projection tensor for the whole adapter";
  torch::NoGradGuard g;
  const auto plain = toy_base()->forward(ids);
  EXPECT_GT(max_diff(expected->get("logits"), plain), 1e-3) << "the fixture's adapter changes the logits";
  const double logits_diff = max_diff(model->forward(ids), expected->get("logits"));
  EXPECT_LE(logits_diff, 1e-5);
  peft::merge_peft(*method, model);
  EXPECT_NE(model->named_modules()["layers.0.attention.q_proj"]->as<d9d::nn::LinearImpl>(), nullptr);
  EXPECT_LE(max_diff(model->forward(ids), expected->get("merged_logits")), 1e-5);
  TempDir out;
  peft::hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", fixture_dir(), out / "merged", 1.0,
                                          ms::no_progress());
  const auto offline = ms::SafetensorsFile::open(out / "merged/model.safetensors");
  const auto state = ms::module_state_dict(*model);
  size_t merged = 0;
  double worst = 0;
  for (const auto& key : expected->keys()) {
    if (key.rfind("merged.", 0) != 0) continue;
    ++merged;
    const std::string name = key.substr(7);
    worst = std::max(worst, max_diff(state.at(name), expected->get(key)));
    EXPECT_LE(max_diff(state.at(name), expected->get(key)), 1e-5) << name;
    EXPECT_LE(max_diff(offline->get(name), expected->get(key)), 1e-5) << "offline " << name;
  }
  EXPECT_EQ(merged, 4u);
  std::printf("VeRA fixture: max |d9d - PEFT| logits %.3g, merged weights %.3g\n", logits_diff, worst);

  // The command line: `d9d-peft merge` writes the same weights, `inspect` shows the VeRA tensors.
  const std::string cli = D9D_PEFT_CLI;
  ASSERT_EQ(std::system(("'" + cli + "' merge --base '" + kToy + "/model.safetensors' --adapter '" + fixture_dir() +
                         "' --out '" + (out / "cli") + "' > '" + (out / "merge.log") + "' 2>&1")
                            .c_str()),
            0)
      << read_bytes(out / "merge.log");
  const auto by_cli = ms::SafetensorsFile::open(out / "cli/model.safetensors");
  for (const auto& key : expected->keys()) {
    if (key.rfind("merged.", 0) == 0) EXPECT_LE(max_diff(by_cli->get(key.substr(7)), expected->get(key)), 1e-5) << key;
  }
  ASSERT_EQ(std::system(("'" + cli + "' inspect '" + fixture_dir() + "' > '" + (out / "inspect.log") + "' 2>&1").c_str()), 0);
  const std::string shown = read_bytes(out / "inspect.log");
  EXPECT_THAT(shown, HasSubstr("VERA"));
  EXPECT_THAT(shown, HasSubstr("base_model.model.layers.1.attention.v_proj.vera_lambda_b"));
  EXPECT_THAT(shown, HasSubstr("trainable parameters: 96"));  // 4 layers x (16 + 8)
  EXPECT_THAT(shown, HasSubstr("frozen shared values: 256"));  // vera_A [8, 16] and vera_B [16, 8]
}

TEST(VeraFiles, WithoutProjectionsTheKeyDrawsThemAgainInTheModelAndOffline) {
  TempDir dir;
  write_fixture_without_projections(dir / "adapter");
  const auto expected = ms::SafetensorsFile::open(fixture_dir() + "/expected.safetensors");
  const auto ids = toy_ids();
  toy::Toy model = toy_base();
  peft::hf::load_adapter(*model, dir / "adapter");
  torch::NoGradGuard g;
  EXPECT_LE(max_diff(model->forward(ids), expected->get("logits")), 1e-5);
  const auto file = ms::SafetensorsFile::open(fixture_dir() + "/adapter_model.safetensors");
  EXPECT_TRUE(torch::equal(vera_layer(model, "layers.0.attention.q_proj")->vera_A, file->get("base_model.vera_A")));
  // Saved again, the file has no projections either.
  peft::hf::save_adapter(*model, dir / "again");
  const auto again = ms::SafetensorsFile::open(dir / "again/adapter_model.safetensors");
  EXPECT_EQ(again->keys().size(), 8u);
  EXPECT_EQ(nlohmann::json::parse(read_bytes(dir / "again/adapter_config.json"))["save_projection"], false);

  const std::string cli = D9D_PEFT_CLI;
  ASSERT_EQ(std::system(("'" + cli + "' merge --base '" + kToy + "/model.safetensors' --adapter '" +
                         (dir / "adapter") + "' --out '" + (dir / "cli") + "' > '" + (dir / "merge.log") + "' 2>&1")
                            .c_str()),
            0)
      << read_bytes(dir / "merge.log");
  const auto by_cli = ms::SafetensorsFile::open(dir / "cli/model.safetensors");
  for (const auto& key : expected->keys()) {
    if (key.rfind("merged.", 0) == 0) EXPECT_LE(max_diff(by_cli->get(key.substr(7)), expected->get(key)), 1e-5) << key;
  }
}

TEST(VeraFiles, ProjectionsThatDisagreeWithTheConfigAreRefusedNamingTheKey) {
  TempDir dir;
  // save_projection true but no projections in the file.
  write_fixture_without_projections(dir / "missing");
  auto config = nlohmann::json::parse(read_bytes(dir / "missing/adapter_config.json"));
  config["save_projection"] = true;
  std::ofstream(dir / "missing/adapter_config.json") << config.dump(2);
  toy::Toy model = toy_base();
  const auto before = ms::module_state_dict(*model);
  EXPECT_THAT([&] { peft::hf::load_adapter(*model, dir / "missing"); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("weights the adapter lacks: base_model.vera_A")));
  EXPECT_EQ(peft::adapter_names(*model).size(), 0u) << "the model is left as it was";
  EXPECT_THAT([&] {
    peft::hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", dir / "missing", dir / "out", 1.0,
                                            ms::no_progress());
  },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("save_projection true but the file holds no")));

  // save_projection false with projections that are not the key's.
  fs::create_directories(dir / "other");
  config["save_projection"] = false;
  std::ofstream(dir / "other/adapter_config.json") << config.dump(2);
  const auto file = ms::SafetensorsFile::open(fixture_dir() + "/adapter_model.safetensors");
  ms::StateDict tensors;
  for (const auto& key : file->keys()) tensors.emplace(key, file->get(key));
  tensors.at("base_model.vera_A") = tensors.at("base_model.vera_A") * 2;
  ms::save_safetensors(dir / "other/adapter_model.safetensors", tensors, {{"format", "pt"}});
  EXPECT_THAT([&] { peft::hf::load_adapter(*model, dir / "other"); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("values in the file differ from the rebuilt ones: "
                                                                  "base_model.vera_A")));
  for (const auto& [key, value] : ms::module_state_dict(*model)) EXPECT_TRUE(torch::equal(value, before.at(key))) << key;
}

TEST(VeraMethod, TrainingLowersTheLossAndChangesOnlyTheVectors) {
  toy::Toy model = toy_base();
  const auto ids = toy_ids();
  torch::manual_seed(4);
  peft::hf::VeraConfig config;
  config.target_modules.regex = ".*(q|v|up|down)_proj";  // [16, 16], [40, 16], [16, 40]
  config.r = 6;
  config.projection_prng_key = 11;
  config.d_initial = 0.5;
  peft::Vera vera(config);
  peft::inject_peft_and_freeze(vera, model);
  auto* q = vera_layer(model, "layers.0.attention.q_proj");
  auto* down = vera_layer(model, "layers.1.mlp.down_proj");
  ASSERT_TRUE(q && down);
  EXPECT_EQ(q->vera_A.sizes(), (std::vector<int64_t>{6, 40})) << "sized for the largest input";
  EXPECT_EQ(q->vera_B.sizes(), (std::vector<int64_t>{40, 6})) << "sized for the largest output";
  EXPECT_TRUE(q->vera_B.is_same(down->vera_B));
  EXPECT_TRUE(torch::equal(q->vera_A, peft::vera::projections(6, 40, 40, 11).first));
  const auto projection_A = q->vera_A.clone(), projection_B = q->vera_B.clone();
  const auto trainable = peft::trainable_parameters(*model);
  EXPECT_EQ(trainable.size(), 2u * 4u * 2u) << "2 layers x 4 projections x (λ_b, λ_d)";
  const auto [first, last] =
      expect_training_changes_only(*model, next_token_loss(model, ids), key_contains(".vera_lambda_"), 2e-2);
  torch::NoGradGuard g;
  EXPECT_TRUE(torch::equal(q->vera_A, projection_A) && torch::equal(q->vera_B, projection_B))
      << "the projections are frozen";
  const auto unmerged = model->forward(ids);
  peft::merge_peft(vera, model);
  EXPECT_LE(max_diff(model->forward(ids), unmerged), 1e-5);
  std::printf("VeRA training: loss %.4f -> %.4f in 10 AdamW steps\n", first, last);
}

TEST(VeraFiles, SaveThenLoadThroughTheRegistryRoundTripsBothWays) {
  const auto ids = toy_ids();
  for (const bool save_projection : {true, false}) {
    SCOPED_TRACE(save_projection ? "save_projection true" : "save_projection false");
    toy::Toy model = toy_base();
    torch::manual_seed(5);
    auto config = config_of({"v_proj", "up_proj", "down_proj"}, 4);
    config.save_projection = save_projection;
    config.projection_prng_key = 3;
    peft::Vera vera(config);
    peft::inject_peft_and_freeze(vera, model);
    TempDir dir;
    peft::hf::save_adapter(*model, dir.str());
    const auto written = nlohmann::json::parse(read_bytes(dir / "adapter_config.json"));
    EXPECT_EQ(written["peft_type"], "VERA");
    EXPECT_EQ(written["r"], 4);
    EXPECT_EQ(written["projection_prng_key"], 3);
    EXPECT_EQ(written["save_projection"], save_projection);
    const auto weights = ms::SafetensorsFile::open(dir / "adapter_model.safetensors");
    EXPECT_EQ(weights->get("base_model.model.layers.0.mlp.up_proj.vera_lambda_b").sizes(), (std::vector<int64_t>{40}));
    EXPECT_EQ(weights->keys().size(), 2u * 3u * 2u + (save_projection ? 2u : 0u));
    if (save_projection) EXPECT_EQ(weights->get("base_model.vera_A").sizes(), (std::vector<int64_t>{4, 40}));

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
}

TEST(VeraFiles, SavingWithoutProjectionsThatTheKeyDoesNotGiveIsRefused) {
  toy::Toy model = toy_base();
  auto config = config_of({"q_proj"}, 4);
  config.save_projection = false;
  peft::Vera vera(config);
  peft::inject_peft_and_freeze(vera, model);
  {
    torch::NoGradGuard g;
    vera_layer(model, "layers.0.attention.q_proj")->vera_A.mul_(2);
  }
  TempDir dir;
  EXPECT_THAT([&] { peft::hf::save_adapter(*model, dir / "out"); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("not the ones projection_prng_key 0 draws")));
  EXPECT_FALSE(fs::exists(dir / "out/adapter_model.safetensors"));
}

TEST(VeraFiles, ABfloat16ModelSavesWithoutProjections) {
  // The projections are drawn in float32 and cast to the layers' dtype (as
  // PEFT's loader casts them), so the key still gives them in bfloat16.
  toy::Toy model = toy_base();
  model->to(at::kBFloat16);
  auto config = config_of({"q_proj", "up_proj"}, 4);
  config.save_projection = false;
  peft::Vera vera(config);
  peft::inject_peft_and_freeze(vera, model);
  auto* q = vera_layer(model, "layers.0.attention.q_proj");
  ASSERT_NE(q, nullptr);
  ASSERT_EQ(q->vera_A.scalar_type(), at::kBFloat16);
  TempDir dir;
  peft::hf::save_adapter(*model, dir / "out");
  const auto weights = ms::SafetensorsFile::open(dir / "out/adapter_model.safetensors");
  for (const auto& key : weights->keys()) EXPECT_EQ(key.find("base_model.vera_"), std::string::npos) << key;

  toy::Toy again = toy_base();
  again->to(at::kBFloat16);
  peft::hf::load_adapter(*again, dir / "out");
  auto* q2 = vera_layer(again, "layers.0.attention.q_proj");
  ASSERT_NE(q2, nullptr);
  EXPECT_TRUE(torch::equal(q2->vera_A, q->vera_A));
  EXPECT_TRUE(torch::equal(q2->vera_B, q->vera_B));
}

TEST(VeraMethod, MergeRefusesNaNAndLeavesTheModel) {
  toy::Toy model = toy_base();
  peft::Vera vera(config_of({"q_proj"}));
  peft::inject_peft_and_freeze(vera, model);
  auto* q = vera_layer(model, "layers.0.attention.q_proj");
  ASSERT_NE(q, nullptr);
  const auto w = q->base_weight().clone();
  {
    torch::NoGradGuard g;
    q->vera_lambda_d[0] = NAN;
  }
  EXPECT_THAT([&] { peft::merge_peft(vera, model); }, ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("NaN or Inf")));
  EXPECT_TRUE(torch::equal(q->base_weight(), w));
  EXPECT_NE(vera_layer(model, "layers.0.attention.q_proj"), nullptr);
}

TEST(VeraConfig, PeftsFieldsAndErrorsNameTheField) {
  const auto c = peft::hf::parse_vera_config(nlohmann::json::parse(read_bytes(fixture_dir() + "/adapter_config.json")),
                                             "adapter_config.json");
  EXPECT_EQ(c.r, 8);
  EXPECT_EQ(c.d_initial, 0.1);
  EXPECT_EQ(c.projection_prng_key, 0);
  EXPECT_TRUE(c.save_projection);
  EXPECT_FALSE(c.init_weights);
  EXPECT_TRUE(c.select("layers.0.attention.v_proj").has_value());
  EXPECT_FALSE(c.select("layers.0.attention.k_proj").has_value());
  auto error_of = [](const std::string& text) {
    try {
      peft::hf::parse_vera_config(nlohmann::json::parse(text), "cfg");
    } catch (const peft::ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string head = R"({"peft_type":"VERA","target_modules":["q"],)";
  EXPECT_THAT(error_of(head + R"("r":0})"), HasSubstr("cfg: r: must be an integer >= 1"));
  EXPECT_THAT(error_of(head + R"("vera_dropout":1.5})"), HasSubstr("cfg: vera_dropout: must be a number in [0, 1)"));
  EXPECT_THAT(error_of(head + R"("projection_prng_key":-1})"), HasSubstr("cfg: projection_prng_key: must be an integer"));
  EXPECT_THAT(error_of(head + R"("fan_in_fan_out":true})"), HasSubstr("cfg: fan_in_fan_out: true is not supported"));
  EXPECT_THAT(error_of(head + R"("bias":"vera_only"})"), HasSubstr("cfg: bias: \"vera_only\" is not supported"));
  EXPECT_THAT(error_of(head + R"("layers_to_transform":[0]})"), HasSubstr("cfg: layers_to_transform: [0] is not supported"));
  EXPECT_THAT(error_of(head + R"("modules_to_save":["lm_head"]})"), HasSubstr("cfg: modules_to_save: "));
  EXPECT_THAT(error_of(head + R"("rank_pattern":{}})"), HasSubstr("cfg: rank_pattern: {} is not supported"));
  EXPECT_THAT(error_of(head + R"("save_projection":"yes"})"), HasSubstr("cfg: save_projection: expected true or false"));
  EXPECT_THAT(error_of(R"({"peft_type":"VERA"})"), HasSubstr("cfg: target_modules: must name the modules"));
  // What we write, we read back the same; the fields are PEFT's.
  const std::string dumped = peft::hf::dump_vera_config(c);
  const auto fixture_fields = nlohmann::json::parse(read_bytes(fixture_dir() + "/adapter_config.json"));
  for (const auto& item : fixture_fields.items()) {
    EXPECT_TRUE(nlohmann::json::parse(dumped).contains(item.key())) << item.key();
  }
  const auto again = peft::hf::parse_vera_config(nlohmann::json::parse(dumped), "dumped");
  EXPECT_EQ(again.target_modules.names, c.target_modules.names);
  EXPECT_EQ(again.r, c.r);
  EXPECT_EQ(again.d_initial, c.d_initial);
  EXPECT_EQ(again.save_projection, c.save_projection);
  EXPECT_EQ(again.init_weights, c.init_weights);
}

TEST(VeraConfig, D9dJsonParsesDumpsAndStacksWithLora) {
  const std::string text =
      R"json({"kind":"vera","module_name_pattern":".*(k_proj|down_proj)","params":{"r":4,"projection_prng_key":5,"save_projection":true,"vera_dropout":0.0,"d_initial":0.1,"init_weights":true}})json";
  EXPECT_EQ(peft::dump_peft_config(peft::parse_peft_config(text)), text);
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"vera","module_name_pattern":"x","params":{}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.r")));
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"vera","module_name_pattern":"x","params":{"r":4,"vera_dropout":1}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.vera_dropout: must be in [0, 1)")));
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"vera","module_name_pattern":"x","params":{"r":4,"alpha":2}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("alpha")));
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"vera","module_name_pattern":"(","params":{"r":4}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("module_name_pattern")));
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
  auto* down = vera_layer(model, "layers.0.mlp.down_proj");
  ASSERT_NE(down, nullptr);
  EXPECT_TRUE(down->vera_lambda_b.requires_grad());
  EXPECT_FALSE(down->vera_A.requires_grad());
  EXPECT_LE(max_diff(model->forward(ids), plain), 1e-6) << "fresh LoRA and VeRA are no-ops";
}
