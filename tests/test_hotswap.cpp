// Hotswapping LoRA adapters in place (PEFT's hotswap_adapter and
// prepare_model_for_compiled_hotswap) and merging adapters while keeping them
// (PEFT's merge_adapter / unmerge_adapter). Numbers are compared with PEFT's
// logits in the fixtures, or with the same adapter loaded the ordinary way.
#include "test_util.h"
#include "toy_model.h"
#include "toy_moe.h"

#include <d9d/peft.h>

#include <torch/optim/adamw.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <map>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::HasSubstr;
using namespace d9d_test;

namespace {

const std::string kAdapterDir = kToy + "/adapters";
const std::string kMixed = kToy + "/mixed_batch";

toy::Toy base_model() {
  toy::Toy model;
  ms::load_model_state(kToy + "/model.safetensors", *ms::identity_mapper_from_module(*model), *model, quiet());
  model->eval();
  return model;
}

toy::Toy with_adapter(const std::string& dir) {
  toy::Toy model = base_model();
  peft::hf::load_adapter(*model, dir);
  return model;
}

at::Tensor toy_ids() { return ms::SafetensorsFile::open(kToy + "/inputs.safetensors")->get("input_ids"); }
at::Tensor mixed_ids() { return ms::SafetensorsFile::open(kMixed + "/inputs.safetensors")->get("input_ids"); }
/// PEFT's logits for a fixture adapter (on `toy_ids()`).
at::Tensor peft_logits(const std::string& adapter, const std::string& key = "logits") {
  return ms::SafetensorsFile::open(kAdapterDir + "/" + adapter + "/expected.safetensors")->get(key);
}
at::Tensor mixed_expected(const std::string& key) {
  return ms::SafetensorsFile::open(kMixed + "/expected.safetensors")->get(key);
}

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

at::Tensor logits(toy::Toy& model, const at::Tensor& ids) {
  torch::NoGradGuard g;
  return model->forward(ids);
}

peft::hf::LoraConfig config_of(const std::string& dir) {
  std::ifstream in(dir + "/adapter_config.json");
  return peft::hf::parse_lora_config(nlohmann::json::parse(in), dir);
}

ms::StateDict tensors_of(const std::string& dir) { return peft::hf::read_adapter_files(dir).tensors; }

/// Every adapter parameter's tensor object and data pointer, by key.
std::map<std::string, std::pair<const void*, const void*>> identities(const torch::nn::Module& model) {
  std::map<std::string, std::pair<const void*, const void*>> out;
  for (const auto& p : model.named_parameters()) {
    if (p.key().find("lora_") == std::string::npos) continue;
    out.emplace(p.key(), std::make_pair(static_cast<const void*>(p.value().unsafeGetTensorImpl()),
                                        static_cast<const void*>(p.value().data_ptr())));
  }
  return out;
}

/// A model with `config`'s adapter loaded the ordinary way (add_adapter and
/// set_peft_model_state_dict): the reference a hotswap must reproduce.
toy::Toy loaded_directly(const peft::hf::LoraConfig& config, const ms::StateDict& tensors) {
  toy::Toy model = base_model();
  peft::hf::add_adapter(*model, "default", config);
  peft::hf::set_peft_model_state_dict(*model, tensors);
  return model;
}

/// What `action` throws (a PeftError), checking that it leaves every tensor
/// of the model bit for bit as it was, and every adapter tensor the same object.
std::string refused(toy::Toy& model, const std::function<void()>& action) {
  std::map<std::string, at::Tensor> before;
  for (const auto& [key, tensor] : ms::module_state_dict(*model)) before.emplace(key, tensor.clone());
  const auto ids_before = identities(*model);
  std::string message = "<no error>";
  try {
    action();
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
    EXPECT_TRUE(torch::equal(tensor.nan_to_num(), after.at(key).nan_to_num())) << key;
  }
  EXPECT_EQ(identities(*model), ids_before);
  return message;
}

peft::LoRALinearImpl* lora_linear(toy::Toy& model, const std::string& name) {
  auto* layer = model->named_modules()[name]->as<peft::LoRALinearImpl>();
  EXPECT_NE(layer, nullptr) << name;
  return layer;
}

}  // namespace

// ------------------------------------------------------------------ hotswap

TEST(Hotswap, SwappingBIntoAModelWithAGivesPeftsLogitsOfBAndKeepsEveryTensor) {
  // PEFT's mixed_batch adapters a (r 4, alpha 8) and b (r 4, alpha 4, rsLoRA)
  // adapt the same layers.
  toy::Toy model = base_model();
  peft::hf::load_adapter(*model, kMixed + "/a");
  ASSERT_LE(max_diff(logits(model, mixed_ids()), mixed_expected("logits_a")), 1e-5);
  const auto before = identities(*model);
  const auto keys_before = ms::module_state_dict(*model);
  torch::optim::AdamW optimizer(peft::trainable_parameters(*model), torch::optim::AdamWOptions(1e-2));
  ASSERT_EQ(optimizer.param_groups().at(0).params().size(), 8u);  // q, v in 2 layers: A, B

  peft::hf::hotswap_adapter(*model, kMixed + "/b");

  const double diff = max_diff(logits(model, mixed_ids()), mixed_expected("logits_b"));
  EXPECT_LE(diff, 1e-5) << "PEFT's logits of b";
  EXPECT_GT(max_diff(mixed_expected("logits_a"), mixed_expected("logits_b")), 1e-2) << "a and b differ";
  EXPECT_EQ(identities(*model), before) << "same tensor objects and storage";
  EXPECT_EQ(ms::module_state_dict(*model).size(), keys_before.size());
  for (const auto& item : keys_before) EXPECT_TRUE(ms::module_state_dict(*model).count(item.first)) << item.first;
  // Both scales are 2, so b's weights are copied exactly.
  auto* q = lora_linear(model, "layers.0.attention.q_proj");
  const auto b = tensors_of(kMixed + "/b");
  EXPECT_TRUE(torch::equal(q->lora_B->weight, b.at("base_model.model.layers.0.attention.q_proj.lora_B.weight")));

  // The optimizer built before still holds the model's tensors and trains them.
  std::set<const void*> model_params;
  for (const auto& p : model->parameters()) model_params.insert(p.unsafeGetTensorImpl());
  for (const auto& p : optimizer.param_groups().at(0).params()) {
    EXPECT_TRUE(model_params.count(p.unsafeGetTensorImpl()));
  }
  const at::Tensor b_before = q->lora_B->weight.clone();
  optimizer.zero_grad();
  model->forward(mixed_ids()).pow(2).mean().backward();
  optimizer.step();
  EXPECT_FALSE(torch::equal(q->lora_B->weight, b_before)) << "the step reached the swapped-in weights";
}

TEST(Hotswap, AnotherScaleIsFoldedIntoLoraBAndMissingLayersAreZeroed) {
  // lora_all_linear_r8: r 8, alpha 16 (scale 2), every linear layer.
  // lora_rslora: r 8, alpha 4, rsLoRA (scale 4 / sqrt(8)), attention only.
  toy::Toy model = with_adapter(kAdapterDir + "/lora_all_linear_r8");
  ASSERT_LE(max_diff(logits(model, toy_ids()), peft_logits("lora_all_linear_r8")), 1e-5);
  const auto before = identities(*model);

  peft::hf::hotswap_adapter(*model, kAdapterDir + "/lora_rslora");

  EXPECT_LE(max_diff(logits(model, toy_ids()), peft_logits("lora_rslora")), 1e-5) << "PEFT's logits of lora_rslora";
  EXPECT_EQ(identities(*model), before);
  auto* q = lora_linear(model, "layers.1.attention.q_proj");
  EXPECT_EQ(q->scale(), 2.0) << "the layer keeps its scale";
  const at::Tensor file_b = tensors_of(kAdapterDir + "/lora_rslora").at("base_model.model.layers.1.attention.q_proj.lora_B.weight");
  EXPECT_LE(max_diff(q->lora_B->weight, file_b * (4.0 / std::sqrt(8.0) / 2.0)), 1e-6);
  // The adapter leaves the MLP out: those layers compute their base.
  auto* up = lora_linear(model, "layers.0.mlp.up_proj");
  EXPECT_EQ(up->lora_A->weight.abs().sum().item<double>(), 0.0);
  EXPECT_EQ(up->lora_B->weight.abs().sum().item<double>(), 0.0);
}

TEST(Hotswap, ALowerRankFillsTheFirstRowsAndTheSavedAdapterComputesTheSame) {
  // lora_attn_r4 (r 4, q and v) into lora_all_linear_r8's rank-8 tensors.
  toy::Toy model = with_adapter(kAdapterDir + "/lora_all_linear_r8");
  peft::hf::hotswap_adapter(*model, kAdapterDir + "/lora_attn_r4");
  const at::Tensor swapped = logits(model, toy_ids());
  EXPECT_LE(max_diff(swapped, peft_logits("lora_attn_r4")), 1e-5);
  auto* v = lora_linear(model, "layers.0.attention.v_proj");
  EXPECT_EQ(v->lora_A->weight.size(0), 8);
  EXPECT_EQ(v->lora_A->weight.narrow(0, 4, 4).abs().sum().item<double>(), 0.0);
  EXPECT_EQ(v->lora_B->weight.narrow(1, 4, 4).abs().sum().item<double>(), 0.0);

  // Saved, the adapter says the layer's r and alpha with the swapped weights:
  // loaded the ordinary way it computes the swapped-in adapter.
  TempDir dir;
  peft::hf::save_adapter(*model, dir / "swapped");
  toy::Toy reloaded = with_adapter(dir / "swapped");
  EXPECT_LE(max_diff(logits(reloaded, toy_ids()), peft_logits("lora_attn_r4")), 1e-5);
}

TEST(Hotswap, PaddingLeavesOutputsUnchangedAndKeepsTensorsAndScale) {
  for (const std::string adapter : {"lora_attn_r4", "dora_mlp", "lora_embed_head", "lora_rslora"}) {
    SCOPED_TRACE(adapter);
    toy::Toy model = with_adapter(kAdapterDir + "/" + adapter);
    const at::Tensor before = logits(model, toy_ids());
    std::map<std::string, const void*> impls;
    for (const auto& [key, ids] : identities(*model)) impls.emplace(key, ids.first);
    peft::prepare_for_hotswap(*model, 12);
    const at::Tensor after = logits(model, toy_ids());
    EXPECT_LE(max_diff(after, before), 1e-6);
    EXPECT_LE(max_diff(after, peft_logits(adapter)), 1e-5);
    for (const auto& [key, ids] : identities(*model)) EXPECT_EQ(impls.at(key), ids.first) << key;
    for (const auto& entry : peft::adapter_layers(*model)) {
      for (const auto& p : entry.layer->adapter_module("default")->named_parameters()) {
        if (p.key() == "lora_magnitude_vector") continue;
        const bool is_a = p.key() == "lora_A.weight" || p.key() == "lora_embedding_A";
        EXPECT_EQ(p.value().size(is_a ? 0 : 1), 12) << entry.name << "." << p.key();
      }
    }
    // The options say rank 12 with the alpha that keeps the scale.
    const auto config = peft::hf::lora_config_of(*model, "default");
    const auto original = config_of(kAdapterDir + "/" + adapter);
    EXPECT_EQ(config.r, 12);
    const double scale = original.use_rslora ? original.lora_alpha / std::sqrt(double(original.r))
                                             : original.lora_alpha / double(original.r);
    EXPECT_NEAR(config.use_rslora ? config.lora_alpha / std::sqrt(12.0) : config.lora_alpha / 12.0, scale, 1e-12);
  }
}

TEST(Hotswap, AfterPaddingAHigherRankSwapsIn) {
  // lora_attn_r4 holds rank 4 at q and v; the new adapter has rank 8 there
  // (lora_rslora's q and v weights, r 8, alpha 4, rsLoRA).
  peft::hf::LoraConfig config = config_of(kAdapterDir + "/lora_rslora");
  config.target_modules = peft::hf::ModuleSelector{};
  config.target_modules.names = {"q_proj", "v_proj"};
  ms::StateDict tensors;
  for (const auto& [key, t] : tensors_of(kAdapterDir + "/lora_rslora")) {
    if (key.find("q_proj") != std::string::npos || key.find("v_proj") != std::string::npos) tensors.emplace(key, t);
  }
  ASSERT_EQ(tensors.size(), 8u);
  toy::Toy reference = loaded_directly(config, tensors);

  toy::Toy model = with_adapter(kAdapterDir + "/lora_attn_r4");
  const std::string message =
      refused(model, [&] { peft::hf::hotswap_adapter_from_state_dict(*model, tensors, config, "default", "r8"); });
  EXPECT_THAT(message, HasSubstr("hotswap_adapter_from_state_dict(r8 into adapter \"default\")"));
  EXPECT_THAT(message, HasSubstr("has rank 8 at 'layers.0.attention.q_proj', above the rank 4"));
  EXPECT_THAT(message, HasSubstr("Call prepare_for_hotswap(model, 8)"));

  peft::prepare_for_hotswap(*model, 8);
  const auto before = identities(*model);
  peft::hf::hotswap_adapter_from_state_dict(*model, tensors, config);
  EXPECT_LE(max_diff(logits(model, toy_ids()), logits(reference, toy_ids())), 1e-5);
  EXPECT_EQ(identities(*model), before);
  // And back to the rank-4 adapter in the same tensors: PEFT's logits again.
  peft::hf::hotswap_adapter(*model, kAdapterDir + "/lora_attn_r4");
  EXPECT_LE(max_diff(logits(model, toy_ids()), peft_logits("lora_attn_r4")), 1e-5);
  EXPECT_EQ(identities(*model), before);
}

TEST(Hotswap, EmbeddingAdaptersSwapWithAnotherRankAndScale) {
  // lora_embed_head: r 4, alpha 4 on embed_tokens and lm_head. The new one:
  // rank 2, alpha 6 (scale 3), random weights.
  torch::manual_seed(3);
  peft::hf::LoraConfig config = config_of(kAdapterDir + "/lora_embed_head");
  config.r = 2;
  config.lora_alpha = 6;
  const ms::StateDict tensors = {
      {"base_model.model.embed_tokens.lora_embedding_A", torch::randn({2, 37})},
      {"base_model.model.embed_tokens.lora_embedding_B", torch::randn({16, 2})},
      {"base_model.model.lm_head.lora_A.weight", torch::randn({2, 16}) * 0.3},
      {"base_model.model.lm_head.lora_B.weight", torch::randn({37, 2}) * 0.3},
  };
  toy::Toy reference = loaded_directly(config, tensors);
  toy::Toy model = with_adapter(kAdapterDir + "/lora_embed_head");
  const auto before = identities(*model);
  peft::hf::hotswap_adapter_from_state_dict(*model, tensors, config);
  const double diff = max_diff(logits(model, toy_ids()), logits(reference, toy_ids()));
  EXPECT_LE(diff, 1e-5);
  EXPECT_GT(max_diff(logits(model, toy_ids()), peft_logits("lora_embed_head")), 1e-2);
  EXPECT_EQ(identities(*model), before);
}

TEST(Hotswap, DoraAdaptersSwapAndALayerLeftOutComputesItsBase) {
  // dora_mlp: r 4, alpha 8, DoRA on up_proj and down_proj. The new adapter:
  // alpha 12, perturbed weights and magnitudes, up_proj only.
  peft::hf::LoraConfig config = config_of(kAdapterDir + "/dora_mlp");
  config.lora_alpha = 12;
  config.target_modules = peft::hf::ModuleSelector{};
  config.target_modules.names = {"up_proj"};
  torch::manual_seed(4);
  ms::StateDict tensors;
  for (const auto& [key, t] : tensors_of(kAdapterDir + "/dora_mlp")) {
    if (key.find("up_proj") != std::string::npos) tensors.emplace(key, t * (1.0 + 0.3 * torch::rand_like(t)));
  }
  ASSERT_EQ(tensors.size(), 6u);
  toy::Toy reference = loaded_directly(config, tensors);
  toy::Toy model = with_adapter(kAdapterDir + "/dora_mlp");
  const auto before = identities(*model);
  peft::hf::hotswap_adapter_from_state_dict(*model, tensors, config);
  EXPECT_LE(max_diff(logits(model, toy_ids()), logits(reference, toy_ids())), 1e-5);
  EXPECT_EQ(identities(*model), before);
}

TEST(Hotswap, ErrorsNameTheCauseAndLeaveTheModelAlone) {
  toy::Toy model = with_adapter(kAdapterDir + "/lora_attn_r4");
  const auto attn = tensors_of(kAdapterDir + "/lora_attn_r4");
  const auto attn_config = config_of(kAdapterDir + "/lora_attn_r4");

  std::string m = refused(model, [&] { peft::hf::hotswap_adapter(*model, kMixed + "/b", "other"); });
  EXPECT_THAT(m, HasSubstr("the model has no adapter \"other\"; its adapters: \"default\""));

  m = refused(model, [&] { peft::hf::hotswap_adapter(*model, kAdapterDir + "/lora_all_linear_r8"); });
  EXPECT_THAT(m, HasSubstr("weights for layers adapter \"default\" does not adapt: "
                           "base_model.model.layers.0.attention.k_proj.lora_A.weight"));
  EXPECT_THAT(m, HasSubstr("Hotswapping cannot adapt new layers"));

  m = refused(model, [&] { peft::hf::hotswap_adapter(*model, kToy + "/tuners/ia3"); });
  EXPECT_THAT(m, HasSubstr("says peft_type IA3; hotswapping replaces LoRA adapters only"));

  auto dora = attn_config;
  dora.use_dora = true;
  m = refused(model, [&] { peft::hf::hotswap_adapter_from_state_dict(*model, attn, dora); });
  EXPECT_THAT(m, HasSubstr("use_dora is true in the new adapter but false in the loaded one ('layers.0.attention.q_proj')"));

  auto dropout = attn_config;
  dropout.lora_dropout = 0.1;
  m = refused(model, [&] { peft::hf::hotswap_adapter_from_state_dict(*model, attn, dropout); });
  EXPECT_THAT(m, HasSubstr("lora_dropout is 0.1 in the new adapter but 0 in the loaded one"));

  auto nan = attn;
  nan["base_model.model.layers.1.attention.v_proj.lora_B.weight"] = nan.at("base_model.model.layers.1.attention.v_proj.lora_B.weight").clone();
  nan["base_model.model.layers.1.attention.v_proj.lora_B.weight"].view(-1)[3] = NAN;
  m = refused(model, [&] { peft::hf::hotswap_adapter_from_state_dict(*model, nan, attn_config); });
  EXPECT_THAT(m, HasSubstr("base_model.model.layers.1.attention.v_proj.lora_B.weight holds 1 NaN or Inf value (of 64)"));

  auto wide = attn;
  wide["base_model.model.layers.0.attention.v_proj.lora_A.weight"] = torch::zeros({4, 17});
  m = refused(model, [&] { peft::hf::hotswap_adapter_from_state_dict(*model, wide, attn_config); });
  EXPECT_THAT(m, HasSubstr("base_model.model.layers.0.attention.v_proj.lora_A.weight [4, 17]"));
  EXPECT_THAT(m, HasSubstr("do not fit 'layers.0.attention.v_proj'"));
  EXPECT_THAT(m, HasSubstr("wrong base model?"));

  auto lacking = attn;
  lacking.erase("base_model.model.layers.1.attention.q_proj.lora_B.weight");
  m = refused(model, [&] { peft::hf::hotswap_adapter_from_state_dict(*model, lacking, attn_config); });
  EXPECT_THAT(m, HasSubstr("some weights of 'layers.1.attention.q_proj' but lacks layers.1.attention.q_proj.lora_B.weight"));

  auto rank = attn_config;
  rank.r = 2;
  m = refused(model, [&] { peft::hf::hotswap_adapter_from_state_dict(*model, attn, rank); });
  EXPECT_THAT(m, HasSubstr("has rank 4 but the new adapter's config gives 'layers.0.attention.q_proj' r = 2"));

  m = refused(model, [&] { peft::hf::hotswap_adapter_from_state_dict(*model, {}, attn_config); });
  EXPECT_THAT(m, HasSubstr("the new adapter holds no weights"));

  peft::merge_adapters_in_place(*model);
  m = refused(model, [&] { peft::hf::hotswap_adapter(*model, kMixed + "/b"); });
  EXPECT_THAT(m, HasSubstr("adapter \"default\" is merged into 'layers.0.attention.q_proj'"));
  EXPECT_THAT(m, HasSubstr("Unmerge it first (unmerge_adapters)"));
}

TEST(Hotswap, PrepareErrorsNameTheAdapterAndTheRank) {
  toy::Toy model = with_adapter(kAdapterDir + "/lora_all_linear_r8");
  std::string m = refused(model, [&] { peft::prepare_for_hotswap(*model, 4); });
  EXPECT_THAT(m, HasSubstr("adapter \"default\" of 'layers.0.attention.q_proj' has rank 8, above target_rank 4"));
  m = refused(model, [&] { peft::prepare_for_hotswap(*model, 0); });
  EXPECT_THAT(m, HasSubstr("target_rank must be >= 1, got 0"));
  toy::Toy bare = base_model();
  m = refused(bare, [&] { peft::prepare_for_hotswap(*bare, 8); });
  EXPECT_THAT(m, HasSubstr("the model holds no LoRA adapter; call it after loading the first adapter"));
}

// ---------------------------------------------------------- merge / unmerge

TEST(MergeUnmerge, MergedLogitsEqualUnmergedAndUnmergeRestoresTheWeights) {
  for (const std::string adapter : {"lora_all_linear_r8", "dora_mlp", "lora_embed_head"}) {
    SCOPED_TRACE(adapter);
    toy::Toy model = with_adapter(kAdapterDir + "/" + adapter);
    const at::Tensor unmerged = logits(model, toy_ids());
    std::map<std::string, at::Tensor> base;
    for (const auto& p : model->named_parameters()) {
      if (p.key().find(".base.") != std::string::npos) base.emplace(p.key(), p.value().clone());
    }
    ASSERT_FALSE(base.empty());

    peft::merge_adapters_in_place(*model);
    for (const auto& entry : peft::adapter_layers(*model)) {
      EXPECT_EQ(entry.layer->merged_adapters(), std::vector<std::string>{"default"}) << entry.name;
    }
    EXPECT_EQ(peft::adapter_names(*model), std::vector<std::string>{"default"}) << "the adapter stays";
    const at::Tensor merged = logits(model, toy_ids());
    EXPECT_LE(max_diff(merged, unmerged), 1e-5);
    EXPECT_LE(max_diff(merged, peft_logits(adapter, "merged_logits")), 1e-5) << "PEFT's merged logits";
    // The merged base weights are PEFT's merged weights.
    const auto expected = ms::SafetensorsFile::open(kAdapterDir + "/" + adapter + "/expected.safetensors");
    for (const auto& entry : peft::adapter_layers(*model)) {
      const at::Tensor w = model->named_parameters()[entry.name + ".base.weight"];
      EXPECT_LE(max_diff(w, expected->get("merged." + entry.name + ".weight")), 1e-5) << entry.name;
    }

    peft::unmerge_adapters(*model);
    for (const auto& entry : peft::adapter_layers(*model)) EXPECT_TRUE(entry.layer->merged_adapters().empty());
    for (const auto& [key, w] : base) {
      const double relative = max_diff(model->named_parameters()[key], w) / w.abs().max().item<double>();
      EXPECT_LE(relative, 1e-6) << key;
    }
    EXPECT_LE(max_diff(logits(model, toy_ids()), unmerged), 1e-5);
  }
}

TEST(MergeUnmerge, SeveralNamedAdaptersMergeAndUnmergeTogether) {
  toy::Toy model = base_model();
  peft::hf::load_adapter(*model, kMixed + "/a", "a");
  peft::hf::load_adapter(*model, kMixed + "/b", "b");
  peft::set_adapter(*model, "b");
  // Named adapters merge whether active or not (PEFT's merge_adapter(["a", "b"])),
  // and a merged adapter computes whether active or not: both terms, summed.
  peft::merge_adapters_in_place(*model, {"a", "b"});
  for (const auto& entry : peft::adapter_layers(*model)) {
    EXPECT_EQ(entry.layer->merged_adapters(), (std::vector<std::string>{"a", "b"})) << entry.name;
  }
  const at::Tensor merged = logits(model, mixed_ids());
  // The reference: both unmerged and active, each adding its own term.
  peft::unmerge_adapters(*model);
  peft::set_adapter(*model, std::vector<std::string>{"a", "b"});
  EXPECT_LE(max_diff(merged, logits(model, mixed_ids())), 1e-5);
  EXPECT_GT(max_diff(merged, mixed_expected("logits_b")), 1e-2) << "a's term is in";
  peft::set_adapter(*model, "a");
  EXPECT_LE(max_diff(logits(model, mixed_ids()), mixed_expected("logits_a")), 1e-5);
}

TEST(MergeUnmerge, ARefusalAtALateLayerRestoresEveryLayerBitExactly) {
  toy::Toy model = with_adapter(kAdapterDir + "/lora_all_linear_r8");
  auto* down = lora_linear(model, "layers.1.mlp.down_proj");  // visited after every attention layer
  {
    torch::NoGradGuard g;
    down->lora_A->weight.fill_(1e20f);
    down->lora_B->weight.fill_(1e20f);
  }
  std::string m = refused(model, [&] { peft::merge_adapters_in_place(*model); });
  EXPECT_THAT(m, HasSubstr("merge_adapters_in_place: merging adapter \"default\" into 'layers.1.mlp.down_proj' overflows"));
  EXPECT_THAT(m, HasSubstr("Nothing was merged"));
  for (const auto& entry : peft::adapter_layers(*model)) EXPECT_TRUE(entry.layer->merged_adapters().empty()) << entry.name;

  {
    torch::NoGradGuard g;
    down->lora_A->weight.fill_(1.0f);
    down->lora_B->weight.view(-1)[7] = std::numeric_limits<float>::infinity();
  }
  m = refused(model, [&] { peft::merge_adapters_in_place(*model); });
  EXPECT_THAT(m, HasSubstr("adapter \"default\" of 'layers.1.mlp.down_proj' holds 1 NaN or Inf value in lora_B.weight"));

  {
    peft::AllowNonFiniteMerge allow;
    peft::merge_adapters_in_place(*model);
  }
  EXPECT_EQ(down->merged_adapters(), std::vector<std::string>{"default"});
}

TEST(MergeUnmerge, ErrorsNameTheAdapterAndWhatToDo) {
  toy::Toy model = with_adapter(kAdapterDir + "/lora_attn_r4");
  std::string m = refused(model, [&] { peft::merge_adapters_in_place(*model, {"nope"}); });
  EXPECT_THAT(m, HasSubstr("merge_adapters_in_place: the model has no adapter \"nope\"; its adapters: \"default\""));
  m = refused(model, [&] { peft::unmerge_adapters(*model); });
  EXPECT_THAT(m, HasSubstr("unmerge_adapters: no adapter is merged into the model"));
  {
    peft::DisableAdapters off(*model);
    m = refused(model, [&] { peft::merge_adapters_in_place(*model); });
    EXPECT_THAT(m, HasSubstr("'layers.0.attention.q_proj' has its adapters disabled"));
  }
  peft::merge_adapters_in_place(*model);
  m = refused(model, [&] { peft::merge_adapters_in_place(*model); });
  EXPECT_THAT(m, HasSubstr("adapter \"default\" is already merged into 'layers.0.attention.q_proj'; call "
                           "unmerge_adapters first"));
  toy::Toy bare = base_model();
  m = refused(bare, [&] { peft::merge_adapters_in_place(*bare); });
  EXPECT_THAT(m, HasSubstr("the model holds no adapter"));
}

TEST(Hotswap, GroupedExpertLayersAreRefusedByName) {
  torch::manual_seed(3);
  toy::ToyMoE model(toy::MoEConfig{});
  peft::LoRA lora({".*experts\\.(gate|up|down)_proj", peft::LoRAParameters().r(4).alpha(8)});
  peft::inject_peft_and_freeze(lora, model);
  std::map<std::string, at::Tensor> before;
  for (const auto& p : model->named_parameters()) before.emplace(p.key(), p.value().clone());
  const auto unchanged = [&] {
    for (const auto& p : model->named_parameters()) {
      EXPECT_TRUE(before.at(p.key()).equal(p.value())) << p.key();
      EXPECT_EQ(before.at(p.key()).sizes(), p.value().sizes()) << p.key();
    }
  };

  try {
    peft::prepare_for_hotswap(*model, 8);
    ADD_FAILURE() << "prepare_for_hotswap padded a grouped layer";
  } catch (const peft::PeftError& e) {
    EXPECT_THAT(e.what(), HasSubstr("'layers.0.moe.experts.gate_proj' is a grouped expert layer (LoRAGroupedLinear)"));
    EXPECT_THAT(e.what(), HasSubstr("nothing was padded"));
  }
  unchanged();

  const auto config = config_of(kAdapterDir + "/lora_attn_r4");
  try {
    peft::hf::hotswap_adapter_from_state_dict(*model, tensors_of(kAdapterDir + "/lora_attn_r4"), config);
    ADD_FAILURE() << "hotswapped into a grouped layer";
  } catch (const peft::PeftError& e) {
    EXPECT_THAT(e.what(), HasSubstr("is a grouped expert layer (LoRAGroupedLinear) holding adapter \"default\""));
    EXPECT_THAT(e.what(), HasSubstr("Nothing was swapped"));
  }
  unchanged();
}
