// The adapter-layer framework: rollback that never merges, DoRA magnitudes
// that follow loaded base weights, shared layers, the method registry, merge
// and unmerge through the AdapterLayer interface.
#include "test_util.h"
#include "toy_model.h"

#include <d9d/peft.h>

#include <torch/nn/modules/container/sequential.h>

#include <nlohmann/json.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::HasSubstr;
using namespace d9d_test;

namespace {

struct MlpImpl : torch::nn::Module {
  MlpImpl()
      : up(register_module("up", d9d::nn::Linear(8, 32))),
        down(register_module("down", d9d::nn::Linear(32, 8))),
        embed(register_module("embed", d9d::nn::Embedding(16, 8))) {}
  torch::Tensor forward(const torch::Tensor& ids) { return down(torch::relu(up(embed(ids)))); }
  d9d::nn::Linear up, down;
  d9d::nn::Embedding embed;
};
TORCH_MODULE(Mlp);

/// Two parents holding the same layer object (a tied projection).
struct TiedImpl : torch::nn::Module {
  TiedImpl() : shared(d9d::nn::Linear(4, 4)) {
    first = register_module("first", torch::nn::Sequential(shared));
    second = register_module("second", torch::nn::Sequential(shared));
    other = register_module("other", d9d::nn::Linear(4, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) { return other(second->forward(first->forward(x))); }
  d9d::nn::Linear shared;
  torch::nn::Sequential first{nullptr}, second{nullptr};
  d9d::nn::Linear other{nullptr};
};
TORCH_MODULE(Tied);

/// Every parameter's value (a copy) and requires_grad flag, by name.
struct Snapshot {
  explicit Snapshot(const torch::nn::Module& m) {
    for (const auto& p : m.named_parameters()) {
      values[p.key()] = p.value().detach().clone();
      flags[p.key()] = p.value().requires_grad();
    }
  }
  std::map<std::string, at::Tensor> values;
  std::map<std::string, bool> flags;
};

/// Bit-identical: same keys, same bytes, same flags.
void expect_same(const Snapshot& before, const torch::nn::Module& m) {
  const Snapshot after(m);
  ASSERT_EQ(after.values.size(), before.values.size());
  for (const auto& [key, value] : before.values) {
    ASSERT_TRUE(after.values.count(key)) << key << " is gone";
    EXPECT_TRUE(torch::equal(after.values.at(key), value)) << key << " changed";
    EXPECT_EQ(after.flags.at(key), before.flags.at(key)) << key << ": requires_grad not restored";
  }
}

/// A model whose flags are not all the same, so "restored" differs from "all frozen" and "all trainable".
Mlp mixed_flags_model() {
  torch::manual_seed(1);
  Mlp model;
  model->down->bias.requires_grad_(false);
  model->embed->weight.requires_grad_(false);
  return model;
}

std::unique_ptr<peft::PeftMethodBase> lora(const std::string& pattern, peft::LoRAParameters params) {
  return std::make_unique<peft::LoRA>(peft::LoRAConfig{pattern, params});
}

toy::Toy toy_base() {
  toy::Toy model;
  ms::load_model_state(kToy + "/model.safetensors", *ms::identity_mapper_from_module(*model), *model, quiet());
  model->eval();
  return model;
}

at::Tensor input_ids() { return ms::SafetensorsFile::open(kToy + "/inputs.safetensors")->get("input_ids"); }

peft::hf::LoraConfig fixture_config(const std::string& adapter) {
  std::ifstream in(kToy + "/adapters/" + adapter + "/adapter_config.json");
  return peft::hf::parse_lora_config(nlohmann::json::parse(in), adapter);
}

}  // namespace

// ------------------------------------------------------------ rollback

TEST(Rollback, FailedStackWithRandomLoraAndDoraLeavesEveryWeightAndFlag) {
  Mlp model = mixed_flags_model();
  const Snapshot before(*model);
  const auto x = torch::randint(0, 16, {3, 5});
  const auto out = model->forward(x).detach();
  std::vector<std::unique_ptr<peft::PeftMethodBase>> methods;
  // B not zero: merging on rollback would add B·A into `up`.
  methods.push_back(lora("up", peft::LoRAParameters().r(2).alpha(4).init(peft::LoRAInit::Random)));
  // DoRA: merging on rollback would rescale `down` and `embed`.
  methods.push_back(lora("down|embed", peft::LoRAParameters().r(2).alpha(4).use_dora(true).init(peft::LoRAInit::Random)));
  methods.push_back(lora("nothing", peft::LoRAParameters()));
  peft::PeftStack stack(std::move(methods));
  EXPECT_THROW(peft::inject_peft_and_freeze(stack, model), peft::PeftError);
  expect_same(before, *model);
  EXPECT_EQ(model->named_children()["up"].get(), model->up.get());
  EXPECT_FALSE(model->up->has_override());
  EXPECT_FALSE(model->embed->has_override());
  EXPECT_TRUE(torch::equal(model->forward(x), out));
}

TEST(Rollback, StackInjectedDirectlyRollsBackToo) {
  Mlp model = mixed_flags_model();
  const Snapshot before(*model);
  EXPECT_THROW(lora("down", peft::LoRAParameters().r(0)), peft::ConfigError) << "refused when built, not injected";
  std::vector<std::unique_ptr<peft::PeftMethodBase>> again;
  again.push_back(lora("up", peft::LoRAParameters().init(peft::LoRAInit::Random)));
  again.push_back(lora("up", peft::LoRAParameters()));  // "up" already holds "default"
  peft::PeftStack stack(std::move(again));
  EXPECT_THAT([&] { stack.inject(*model); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("'up' already holds an adapter \"default\"")));
  expect_same(before, *model);
}

TEST(Rollback, FailedLoadAdapterLeavesTheBaseTrainable) {
  toy::Toy model = toy_base();
  const Snapshot before(*model);
  TempDir dir;
  const std::string src = kToy + "/adapters/lora_attn_r4";
  std::filesystem::copy_file(src + "/adapter_config.json", dir / "adapter_config.json");
  // Weights of another adapter: keys do not fit, after the layers were injected.
  std::filesystem::copy_file(kToy + "/adapters/dora_mlp/adapter_model.safetensors",
                             dir / "adapter_model.safetensors");
  EXPECT_THROW(peft::hf::load_adapter(*model, dir.str()), peft::PeftError);
  expect_same(before, *model);
  EXPECT_TRUE(peft::adapter_names(*model).empty());
}

TEST(Rollback, MethodTrainingNothingIsRolledBackNotMerged) {
  Mlp model = mixed_flags_model();
  peft::hf::LoraConfig config = fixture_config("lora_attn_r4");
  config.target_modules.names = {"up"};
  config.init = peft::LoRAInit::Random;
  auto first = peft::hf::add_adapter(*model, "a", config);  // active, trainable
  const Snapshot before(*model);
  // A second adapter is added inactive: it trains nothing, so this is refused.
  peft::hf::HfLoRA second(config, "b");
  EXPECT_THROW(peft::inject_peft_and_freeze(second, model), peft::PeftError);
  expect_same(before, *model);
  EXPECT_EQ(peft::adapter_names(*model), (std::vector<std::string>{"a"}));
}

// ------------------------------------------------- DoRA after loading

TEST(DoraLoading, InjectedBeforeLoadingMatchesInjectedAfter) {
  const auto ids = input_ids();
  peft::hf::LoraConfig config = fixture_config("dora_mlp");
  config.init = peft::LoRAInit::Random;  // B != 0, so the magnitude depends on W through W + sBA

  toy::Toy after = toy_base();
  torch::manual_seed(7);
  peft::hf::HfLoRA late(config);
  peft::inject_peft_and_freeze(late, after);

  torch::manual_seed(11);
  toy::Toy before;  // random weights at injection
  torch::manual_seed(7);
  peft::hf::HfLoRA early(config);
  auto mapper = peft::inject_peft_and_freeze(early, before);
  ms::load_model_state(kToy + "/model.safetensors", *mapper, *before, quiet());
  before->eval();

  torch::NoGradGuard g;
  const auto expected = after->forward(ids);
  EXPECT_LE((before->forward(ids) - expected).abs().max().item<double>(), 1e-5);
  // Without the after-load hook the magnitudes would be the random weights' norms.
  const auto* layer = before->named_modules()["layers.0.mlp.up_proj"]->as<peft::LoRALinearImpl>();
  const auto* reference = after->named_modules()["layers.0.mlp.up_proj"]->as<peft::LoRALinearImpl>();
  ASSERT_NE(layer, nullptr);
  EXPECT_TRUE(torch::allclose(layer->lora_magnitude_vector, reference->lora_magnitude_vector, 1e-6, 1e-6));
}

TEST(DoraLoading, InjectedBeforeLoadingGivesPeftsLogits) {
  const std::string dir = kToy + "/adapters/dora_mlp";
  auto expected = ms::SafetensorsFile::open(dir + "/expected.safetensors");
  torch::manual_seed(3);
  toy::Toy model;
  peft::hf::HfLoRA method(fixture_config("dora_mlp"));
  auto mapper = peft::inject_peft_and_freeze(method, model);
  ms::load_model_state(kToy + "/model.safetensors", *mapper, *model, quiet());
  auto adapter = ms::open_checkpoint(dir + "/adapter_model.safetensors");
  ms::StateDict weights;
  for (const auto& key : adapter->keys()) weights.emplace(key, adapter->read(key));
  peft::hf::set_peft_model_state_dict(*model, weights);
  model->eval();
  torch::NoGradGuard g;
  EXPECT_LE((model->forward(input_ids()) - expected->get("logits")).abs().max().item<double>(), 1e-5);
}

namespace {

/// A toy with random weights and a fresh (B = 0) DoRA adapter on its MLP; the mapper to load it.
std::pair<toy::Toy, ms::MapperPtr> fresh_dora_on_random_weights() {
  torch::manual_seed(5);
  toy::Toy model;
  auto config = fixture_config("dora_mlp");
  config.init = peft::LoRAInit::Default;
  peft::hf::HfLoRA method(config);
  auto mapper = peft::inject_peft_and_freeze(method, model);
  return {model, mapper};
}

}  // namespace

TEST(DoraLoading, AFreshDoraAdapterLeavesALoadedModelsOutputAlone) {
  // Default init (B = 0): the model must compute the base once the base is loaded.
  const auto ids = input_ids();
  toy::Toy plain = toy_base();
  auto [model, mapper] = fresh_dora_on_random_weights();
  ms::load_model_state(kToy + "/model.safetensors", *mapper, *model, quiet());
  model->eval();
  torch::NoGradGuard g;
  EXPECT_LE((model->forward(ids) - plain->forward(ids)).abs().max().item<double>(), 1e-5);
}

TEST(DoraLoading, ExplicitCallForWeightsWrittenOtherwise) {
  const auto ids = input_ids();
  toy::Toy plain = toy_base();
  toy::Toy model = fresh_dora_on_random_weights().first;
  // Base weights copied in by hand: no loader, so no hook.
  {
    torch::NoGradGuard g;
    const auto source = ms::module_state_dict(*plain);
    for (auto& item : model->named_parameters()) {
      std::string key = item.key();
      const auto at = key.find(".base.");
      if (at != std::string::npos) key.erase(at, 5);
      if (source.count(key)) item.value().copy_(source.at(key));
    }
  }
  model->eval();
  torch::NoGradGuard g;
  EXPECT_GT((model->forward(ids) - plain->forward(ids)).abs().max().item<double>(), 1e-3)
      << "magnitudes from the random weights must be off before the call";
  peft::after_base_weights_loaded(*model);
  EXPECT_LE((model->forward(ids) - plain->forward(ids)).abs().max().item<double>(), 1e-5);
}

// ------------------------------------------------------- shared layers

TEST(SharedLayers, ALayerAtTwoPathsIsRefusedNamingBoth) {
  Tied model;
  const Snapshot before(*model);
  peft::LoRA method({".*0|other", peft::LoRAParameters()});
  EXPECT_THAT([&] { peft::inject_peft_and_freeze(method, model); },
              ::testing::ThrowsMessage<peft::PeftError>(
                  ::testing::AllOf(HasSubstr("'first.0'"), HasSubstr("'second.0'"), HasSubstr("shared or tied"))));
  expect_same(before, *model);
  EXPECT_FALSE(model->shared->has_override());
}

TEST(SharedLayers, ListModulesVisitsEachObjectOnceWithItsAliases) {
  Tied model;
  size_t shared = 0;
  for (const auto& entry : peft::list_modules(*model)) {
    if (entry.module.get() != model->shared.get()) continue;
    ++shared;
    EXPECT_EQ(entry.name, "first.0");
    EXPECT_EQ(entry.aliases, (std::vector<std::string>{"second.0"}));
  }
  EXPECT_EQ(shared, 1u);
}

TEST(SharedLayers, UnsharedLayersOfTheSameModelStillAdapt) {
  Tied model;
  peft::LoRA method({"other", peft::LoRAParameters()});
  peft::inject_peft_and_freeze(method, model);
  EXPECT_NE(model->named_children()["other"]->as<peft::LoRALinearImpl>(), nullptr);
}

// ------------------------------------------------ merge and unmerge

TEST(AdapterLayerInterface, MergeAndUnmergeRoundTripAndKeepTheOutput) {
  for (const bool dora : {false, true}) {
    torch::manual_seed(2);
    d9d::nn::Linear base(12, 10);
    const auto w = base->weight.detach().clone();
    peft::LoRALinearImpl layer(base.ptr(), peft::LoRAParameters().r(3).alpha(6).use_dora(dora).init(peft::LoRAInit::Random));
    peft::AdapterLayer& generic = layer;
    torch::NoGradGuard g;
    const auto x = torch::randn({4, 12});
    const auto unmerged_out = layer.forward(x);
    generic.merge_adapter("default");
    EXPECT_EQ(generic.merged_adapters(), (std::vector<std::string>{"default"}));
    EXPECT_FALSE(torch::equal(base->weight, w)) << "dora=" << dora;
    EXPECT_LE((layer.forward(x) - unmerged_out).abs().max().item<double>(), 1e-5) << "merged forward, dora=" << dora;
    EXPECT_THROW(generic.merge_adapter("default"), peft::PeftError) << "merging twice";
    generic.unmerge_adapter("default");
    EXPECT_TRUE(generic.merged_adapters().empty());
    EXPECT_LE((base->weight - w).abs().max().item<double>(), 1e-5) << "unmerge restores W, dora=" << dora;
    EXPECT_THROW(generic.unmerge_adapter("default"), peft::PeftError) << "unmerging an unmerged adapter";
  }
}

TEST(AdapterLayerInterface, MergedLinearEqualsTheDirectFormula) {
  torch::manual_seed(4);
  d9d::nn::Linear base(6, 5);
  const auto w = base->weight.detach().clone();
  peft::LoRALinearImpl layer(base.ptr(), peft::LoRAParameters().r(2).alpha(3).init(peft::LoRAInit::Random));
  const auto expected = w + 1.5 * layer.lora_B->weight.detach().mm(layer.lora_A->weight.detach());
  layer.merge_adapter("default");
  EXPECT_LE((base->weight - expected).abs().max().item<double>(), 1e-6);
}

TEST(AdapterLayerInterface, DisableAdaptersRefusesMergedLayers) {
  Mlp model;
  peft::LoRA method({"up", peft::LoRAParameters()});
  peft::inject_peft_and_freeze(method, model);
  auto* layer = dynamic_cast<peft::AdapterLayer*>(model->named_children()["up"].get());
  ASSERT_NE(layer, nullptr);
  layer->merge_adapter("default");
  EXPECT_THAT([&] { peft::DisableAdapters off(*model); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("'up' has adapter \"default\" merged")));
  EXPECT_TRUE(layer->adapters_enabled());
}

TEST(AdapterLayerInterface, AddAdapterTakesOnlyItsMethodsOptions) {
  d9d::nn::Linear base(4, 4);
  peft::LoRALinearImpl layer(base.ptr(), peft::LoRAParameters());
  struct OtherOptions : peft::AdapterOptions {};
  EXPECT_THAT([&] { layer.add_adapter("x", OtherOptions{}); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("takes LoRAParameters")));
  EXPECT_EQ(layer.adapter_names(), (std::vector<std::string>{"default"}));
}

// ------------------------------------------------------------ registry

TEST(Registry, BuiltinKindsAndPeftTypes) {
  const auto kinds = peft::registered_kinds();
  for (const char* kind : {"lora", "full_tune", "stack"}) {
    EXPECT_NE(std::find(kinds.begin(), kinds.end(), kind), kinds.end()) << kind;
  }
  const auto types = peft::registered_peft_types();
  EXPECT_NE(std::find(types.begin(), types.end(), "LORA"), types.end());
  EXPECT_NE(std::find(types.begin(), types.end(), "LOHA"), types.end());
  EXPECT_NE(std::find(types.begin(), types.end(), "OFT"), types.end());
  EXPECT_NE(std::find(types.begin(), types.end(), "LOKR"), types.end());
  EXPECT_NE(std::find(types.begin(), types.end(), "VERA"), types.end());
  EXPECT_THAT([] { peft::method_for_peft_type("ADALORA", "adapter_config.json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(
                  AllOf(HasSubstr("adapter_config.json: peft_type"), HasSubstr("\"ADALORA\" is not supported"))));
}

namespace {

/// A method defined outside the library: trains the modules a pattern names
/// (as FullTune), registered under its own kind.
struct ScaleOnlyConfig {
  static constexpr const char* kind = "test_norms_only";
  std::string pattern;
};

class ScaleOnly : public peft::PeftMethod<ScaleOnlyConfig> {
 public:
  using PeftMethod::PeftMethod;
  peft::PeftInjectionResult inject(torch::nn::Module& module) override {
    peft::PeftInjectionResult r;
    for (const auto& p : module.named_parameters()) {
      if (p.key().find(config_.pattern) != std::string::npos) r.parameters_to_train.push_back(p.value());
    }
    return r;
  }
  void merge(torch::nn::Module&) override {}
};

}  // namespace

TEST(Registry, AMethodRegisteredOutsideTheLibraryParsesDumpsAndBuilds) {
  peft::PeftMethodRegistration r;
  r.kind = ScaleOnlyConfig::kind;
  r.parse = [](const nlohmann::json& j, const std::string& path) -> peft::AnyPeftConfig {
    if (!j.contains("pattern") || !j["pattern"].is_string()) throw peft::ConfigError(path + ".pattern", "field required");
    return ScaleOnlyConfig{j["pattern"].get<std::string>()};
  };
  r.write = [](const peft::AnyPeftConfig& c, nlohmann::ordered_json& out) {
    out = {{"kind", ScaleOnlyConfig::kind}, {"pattern", c.get<ScaleOnlyConfig>().pattern}};
  };
  r.make_method = [](const peft::AnyPeftConfig& c) -> std::unique_ptr<peft::PeftMethodBase> {
    return std::make_unique<ScaleOnly>(c.get<ScaleOnlyConfig>());
  };
  peft::register_peft_method(r);
  EXPECT_THROW(peft::register_peft_method(r), peft::PeftError) << "a kind is registered once";

  const std::string text = R"({"kind":"stack","methods":[{"kind":"test_norms_only","pattern":"bias"}]})";
  const auto config = peft::parse_peft_config(text);
  EXPECT_EQ(peft::dump_peft_config(config), text);
  EXPECT_THAT([] { peft::parse_peft_config(R"({"kind":"test_norms_only"})"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("pattern: field required")));
  Mlp model;
  auto method = peft::peft_method_from_config(config);
  peft::inject_peft_and_freeze(*method, model);
  EXPECT_TRUE(model->up->bias.requires_grad());
  EXPECT_FALSE(model->up->weight.requires_grad());
  const auto kinds = peft::registered_kinds();
  EXPECT_NE(std::find(kinds.begin(), kinds.end(), "test_norms_only"), kinds.end());
}

TEST(Registry, AnyPeftConfigTellsItsKind) {
  const peft::AnyPeftConfig config = peft::LoRAConfig{".*", peft::LoRAParameters()};
  EXPECT_EQ(config.kind(), "lora");
  EXPECT_NE(config.get_if<peft::LoRAConfig>(), nullptr);
  EXPECT_EQ(config.get_if<peft::FullTuneConfig>(), nullptr);
  EXPECT_THAT([&] { config.get<peft::FullTuneConfig>(); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("the config is \"lora\", not \"full_tune\"")));
  EXPECT_THAT([] { peft::validate(peft::AnyPeftConfig{}); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("an empty AnyPeftConfig")));
}

// ------------------------------------------------------ config checks

TEST(ConfigChecks, ABadRankPatternRegexFailsAtParseTimeNamingTheField) {
  std::ifstream in(kToy + "/adapters/lora_attn_r4/adapter_config.json");
  auto j = nlohmann::json::parse(in);
  j["rank_pattern"] = {{"q_proj(", 2}};
  EXPECT_THAT([&] { peft::hf::parse_lora_config(j, "adapter_config.json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("adapter_config.json: rank_pattern.q_proj(: ")));
  j["rank_pattern"] = nlohmann::json::object();
  j["alpha_pattern"] = {{"[v", 2}};
  EXPECT_THAT([&] { peft::hf::parse_lora_config(j, "adapter_config.json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("alpha_pattern.[v: ")));
}

TEST(ConfigChecks, LoraParametersChainAndValidateWithFieldPaths) {
  const auto p = peft::LoRAParameters().r(4).alpha(8).dropout(0.1).use_rslora(true);
  EXPECT_EQ(p.r(), 4);
  EXPECT_DOUBLE_EQ(p.scale(), 8.0 / 2.0);
  EXPECT_THAT([] { peft::LoRAParameters().dropout(1.0).validate("params"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.dropout: must be in [0, 1), got 1")));
  // The d9d JSON keeps the Python original's output; flags it lacks appear only when set.
  EXPECT_EQ(peft::dump_peft_config(peft::LoRAConfig{"x", peft::LoRAParameters().r(4).alpha(8)}),
            R"({"kind":"lora","module_name_pattern":"x","params":{"r":4,"alpha":8,"dropout":0.0}})");
  EXPECT_EQ(peft::dump_peft_config(peft::parse_peft_config(
                R"({"kind":"lora","module_name_pattern":"x","params":{"r":4,"alpha":8,"dropout":0.0,"use_dora":true}})")),
            R"({"kind":"lora","module_name_pattern":"x","params":{"r":4,"alpha":8,"dropout":0.0,"use_dora":true}})");
}

TEST(ConfigChecks, AConfigBuiltInCodeIsCheckedWhenTheMethodIsBuilt) {
  peft::hf::LoraConfig config;
  config.target_modules.regex = "q_proj(";
  EXPECT_THAT([&] { peft::hf::HfLoRA method(config); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("LoraConfig: target_modules: invalid regular expression")));
  config.target_modules.regex = ".*q_proj";
  config.rank_pattern = {{"v(", 2}};
  EXPECT_THAT([&] { peft::hf::HfLoRA method(config); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("rank_pattern.v(")));
}
