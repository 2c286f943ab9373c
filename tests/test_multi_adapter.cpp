// Several named LoRA adapters in one model: switching reproduces real PEFT's
// per-adapter logits (fixtures/hf_peft/toy/mixed_batch), several active
// adapters add up as the formula says, delete/disable/cast/merge one.
#include "test_util.h"
#include "toy_model.h"

#include <d9d/peft.h>

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/optim/sgd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;
using namespace d9d_test;

namespace {

const std::string kMixed = kToy + "/mixed_batch";

toy::Toy base_model() {
  toy::Toy model;
  ms::load_model_state(kToy + "/model.safetensors", *ms::identity_mapper_from_module(*model), *model, quiet());
  model->eval();
  return model;
}

/// The toy model with PEFT's two mixed_batch adapters loaded as "a" and "b".
toy::Toy two_adapters() {
  toy::Toy model = base_model();
  peft::hf::load_adapter(*model, kMixed + "/a", "a");
  peft::hf::load_adapter(*model, kMixed + "/b", "b");
  return model;
}

at::Tensor mixed_ids() { return ms::SafetensorsFile::open(kMixed + "/inputs.safetensors")->get("input_ids"); }
at::Tensor expected(const std::string& key) {
  return ms::SafetensorsFile::open(kMixed + "/expected.safetensors")->get(key);
}

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

at::Tensor logits(toy::Toy& model) {
  torch::NoGradGuard g;
  return model->forward(mixed_ids());
}

std::set<std::string> keys_of(const torch::nn::Module& m) {
  std::set<std::string> out;
  for (const auto& item : ms::module_state_dict(m)) out.insert(item.first);
  return out;
}

peft::hf::LoraConfig config_of(const std::string& dir) {
  std::ifstream in(dir + "/adapter_config.json");
  return peft::hf::parse_lora_config(nlohmann::json::parse(in), dir);
}

}  // namespace

TEST(MultiAdapter, SwitchingReproducesPeftsPerAdapterLogits) {
  toy::Toy model = two_adapters();
  EXPECT_EQ(peft::adapter_names(*model), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(peft::active_adapters(*model), (std::vector<std::string>{"a"})) << "a second load adds inactive";
  EXPECT_LE(max_diff(logits(model), expected("logits_a")), 1e-5);

  peft::set_adapter(*model, "b");
  EXPECT_EQ(peft::active_adapters(*model), (std::vector<std::string>{"b"}));
  EXPECT_LE(max_diff(logits(model), expected("logits_b")), 1e-5);

  peft::set_adapter(*model, "a");
  EXPECT_LE(max_diff(logits(model), expected("logits_a")), 1e-5);
  EXPECT_GT(max_diff(expected("logits_a"), expected("logits_b")), 1e-3) << "the fixture's adapters differ";

  // Each adapter alone in a model of its own gives the same numbers.
  toy::Toy only_b = base_model();
  peft::hf::load_adapter(*only_b, kMixed + "/b", "b");
  peft::set_adapter(*model, "b");
  EXPECT_TRUE(torch::equal(logits(model), logits(only_b)));
}

TEST(MultiAdapter, DisableGuardComputesTheBaseAndRestoresOnLeaving) {
  toy::Toy model = two_adapters();
  peft::set_adapter(*model, "b");
  {
    peft::DisableAdapters off(*model);
    EXPECT_LE(max_diff(logits(model), expected("logits_base")), 1e-5);
    {
      peft::DisableAdapters nested(*model);
      EXPECT_LE(max_diff(logits(model), expected("logits_base")), 1e-5);
    }
    EXPECT_LE(max_diff(logits(model), expected("logits_base")), 1e-5) << "the inner guard restores 'disabled'";
  }
  EXPECT_LE(max_diff(logits(model), expected("logits_b")), 1e-5);
  // Also when the scope is left by an exception.
  try {
    peft::DisableAdapters off(*model);
    throw std::runtime_error("leave");
  } catch (const std::runtime_error&) {
  }
  EXPECT_LE(max_diff(logits(model), expected("logits_b")), 1e-5);
}

TEST(MultiAdapter, OneAdapterKeepsD9dKeysFurtherOnesSitUnderAdapters) {
  toy::Toy model = base_model();
  peft::hf::load_adapter(*model, kMixed + "/a", "a");
  const auto one = keys_of(*model);
  EXPECT_EQ(one.count("layers.0.attention.q_proj.base.weight"), 1u);
  EXPECT_EQ(one.count("layers.0.attention.q_proj.lora_A.weight"), 1u);
  EXPECT_EQ(one.count("layers.0.attention.q_proj.lora_B.weight"), 1u);
  EXPECT_EQ(one.size(), 24u + 8u);  // 2 layers x {q, v} x {A, B}

  peft::hf::load_adapter(*model, kMixed + "/b", "b");
  const auto two = keys_of(*model);
  EXPECT_EQ(two.count("layers.0.attention.q_proj.lora_A.weight"), 1u) << "the first adapter keeps its keys";
  EXPECT_EQ(two.count("layers.0.attention.q_proj.adapters.b.lora_A.weight"), 1u);
  EXPECT_EQ(two.count("layers.1.attention.v_proj.adapters.b.lora_B.weight"), 1u);
  EXPECT_EQ(two.size(), 24u + 16u);

  // PEFT's file keys carry no adapter name, whichever slot the adapter sits in.
  const auto b = peft::hf::get_peft_model_state_dict(*model, "b");
  auto file = ms::SafetensorsFile::open(kMixed + "/b/adapter_model.safetensors");
  ASSERT_EQ(b.size(), file->keys().size());
  for (const auto& key : file->keys()) EXPECT_TRUE(torch::equal(b.at(key), file->get(key))) << key;
  EXPECT_THAT([&] { peft::hf::get_peft_model_state_dict(*model); },
              ThrowsMessage<peft::PeftError>(HasSubstr("several adapters (\"a\", \"b\"); name the one you mean")));
}

TEST(MultiAdapter, BaseCheckpointLoadsIntoAModelWithTwoFreshAdapters) {
  toy::Toy model;
  peft::hf::HfLoRA a(config_of(kMixed + "/a"), "a");
  auto mapper = peft::inject_peft_and_freeze(a, model);
  peft::hf::add_adapter(*model, "b", config_of(kMixed + "/b"));
  EXPECT_EQ(peft::adapter_names(*model), (std::vector<std::string>{"a", "b"}));
  ms::load_model_state(kToy + "/model.safetensors", *mapper, *model, quiet());
  model->eval();
  peft::DisableAdapters off(*model);
  EXPECT_LE(max_diff(logits(model), expected("logits_base")), 1e-5);
}

TEST(MultiAdapter, OnlyActiveAdaptersTrain) {
  toy::Toy model = two_adapters();
  auto& q = *model->layers[0]->as<toy::LayerImpl>()->attention->named_children()["q_proj"]->as<peft::LoRALinearImpl>();
  auto trainable = [&] { return peft::trainable_parameters(*model).size(); };
  EXPECT_EQ(trainable(), 8u) << "a's 2 layers x 2 projections x {A, B}";
  EXPECT_TRUE(q.adapter("a").lora_A->weight.requires_grad());
  EXPECT_FALSE(q.adapter("b").lora_A->weight.requires_grad());
  EXPECT_FALSE(q.base_weight().requires_grad());

  peft::set_adapter(*model, "b");
  EXPECT_EQ(trainable(), 8u);
  EXPECT_FALSE(q.adapter("a").lora_A->weight.requires_grad());
  ASSERT_TRUE(q.adapter("b").lora_A->weight.requires_grad());

  const at::Tensor a_before = q.adapter("a").lora_B->weight.clone();
  const at::Tensor b_before = q.adapter("b").lora_B->weight.clone();
  model->train();
  torch::optim::SGD opt(peft::trainable_parameters(*model), torch::optim::SGDOptions(0.1));
  const auto ids = mixed_ids();
  auto out = model->forward(ids.slice(1, 0, -1));
  torch::nn::functional::cross_entropy(out.reshape({-1, 37}), ids.slice(1, 1).reshape({-1})).backward();
  opt.step();
  EXPECT_TRUE(torch::equal(q.adapter("a").lora_B->weight, a_before));
  EXPECT_FALSE(torch::equal(q.adapter("b").lora_B->weight, b_before));
  EXPECT_FALSE(q.adapter("a").lora_B->weight.grad().defined()) << "an inactive adapter is not in the graph";

  peft::set_adapter(*model, std::vector<std::string>{"a", "b"});
  EXPECT_EQ(trainable(), 16u);
}

TEST(MultiAdapter, SeveralActiveAdaptersAddUpAsTheFormulaSays) {
  // One linear layer with bias, two random adapters: the output is
  // x W^T + b + s_a (x A_a^T) B_a^T + s_b (x A_b^T) B_b^T.
  torch::manual_seed(3);
  auto base = d9d::nn::Linear(torch::nn::LinearOptions(12, 10));
  const auto oa = peft::LoRAParameters().r(4).alpha(8).init(peft::LoRAInit::Random);
  const auto ob = peft::LoRAParameters().r(2).alpha(3).init(peft::LoRAInit::Random).use_rslora(true);
  auto layer = std::make_shared<peft::LoRALinearImpl>(base.ptr(), oa, "a");
  layer->add_adapter("b", ob);
  layer->set_active_adapters({"a", "b"});
  const auto x = torch::randn({3, 5, 12});
  auto term = [&](const std::string& n, double s) {
    auto& ad = layer->adapter(n);
    return s * x.matmul(ad.lora_A->weight.t()).matmul(ad.lora_B->weight.t());
  };
  const auto plain = x.matmul(base->weight.t()) + base->bias;
  torch::NoGradGuard g;
  EXPECT_LE(max_diff(layer->forward(x), plain + term("a", 2.0) + term("b", 3.0 / std::sqrt(2.0))), 1e-5);
  layer->set_active_adapters({"b"});
  EXPECT_LE(max_diff(layer->forward(x), plain + term("b", 3.0 / std::sqrt(2.0))), 1e-5);
  layer->set_active_adapters({});
  EXPECT_LE(max_diff(layer->forward(x), plain), 1e-6);

  // The same on an embedding: W[ids] + sum s (A^T[ids]) B^T.
  auto emb_base = d9d::nn::Embedding(torch::nn::EmbeddingOptions(9, 6));
  auto emb = std::make_shared<peft::LoRAEmbeddingImpl>(emb_base.ptr(), oa, "a");
  emb->add_adapter("b", peft::LoRAParameters().r(3).alpha(6));
  emb->set_active_adapters({"a", "b"});
  {
    torch::NoGradGuard ng;
    emb->adapter("b").lora_embedding_A.normal_();
  }
  const auto ids = torch::randint(0, 9, {2, 4}, at::kLong);
  auto eterm = [&](const std::string& n, double s) {
    auto& ad = emb->adapter(n);
    return s * ad.lora_embedding_A.t().index({ids}).matmul(ad.lora_embedding_B.t());
  };
  EXPECT_LE(max_diff(emb->forward(ids), emb_base->weight.index({ids}) + eterm("a", 2.0) + eterm("b", 2.0)), 1e-5);
}

TEST(MultiAdapter, DeleteMovesTheNextAdapterUpAndTheLastRestoresTheBase) {
  toy::Toy model = two_adapters();  // a active
  peft::delete_adapter(*model, "a");
  EXPECT_EQ(peft::adapter_names(*model), (std::vector<std::string>{"b"}));
  EXPECT_EQ(peft::active_adapters(*model), (std::vector<std::string>{"b"}))
      << "deleting the active adapter activates the first remaining one, as PEFT does";
  const auto keys = keys_of(*model);
  EXPECT_EQ(keys.count("layers.0.attention.q_proj.lora_A.weight"), 1u) << "b moved to the single-adapter keys";
  EXPECT_EQ(keys.count("layers.0.attention.q_proj.adapters.b.lora_A.weight"), 0u);
  EXPECT_EQ(keys.size(), 24u + 8u);
  EXPECT_LE(max_diff(logits(model), expected("logits_b")), 1e-5);
  EXPECT_EQ(peft::trainable_parameters(*model).size(), 8u);

  peft::delete_adapter(*model, "b");
  EXPECT_TRUE(peft::adapter_names(*model).empty());
  EXPECT_EQ(keys_of(*model).size(), 24u) << "the original keys are back";
  EXPECT_NE(model->layers[0]->as<toy::LayerImpl>()->attention->named_children()["q_proj"]->as<d9d::nn::LinearImpl>(),
            nullptr);
  EXPECT_LE(max_diff(logits(model), expected("logits_base")), 1e-5);

  // The model takes a fresh adapter again afterwards.
  peft::hf::load_adapter(*model, kMixed + "/a", "a");
  EXPECT_LE(max_diff(logits(model), expected("logits_a")), 1e-5);
}

TEST(MultiAdapter, MergingOneAdapterKeepsTheOther) {
  toy::Toy model = base_model();
  auto a = peft::hf::load_adapter(*model, kMixed + "/a", "a");
  peft::hf::load_adapter(*model, kMixed + "/b", "b");
  peft::merge_peft(*a, model);
  EXPECT_EQ(peft::adapter_names(*model), (std::vector<std::string>{"b"}));
  EXPECT_TRUE(peft::active_adapters(*model).empty()) << "b was inactive and stays so";
  EXPECT_LE(max_diff(logits(model), expected("logits_a")), 1e-5) << "a is in the base weights now";
  EXPECT_EQ(keys_of(*model).count("layers.0.attention.q_proj.lora_A.weight"), 1u);
}

TEST(MultiAdapter, CastAdapterDtypeComputesTheTermInTheAdaptersDtype) {
  torch::manual_seed(5);
  auto base = d9d::nn::Linear(torch::nn::LinearOptions(16, 8));
  base->to(at::kBFloat16);
  auto model = torch::nn::Sequential();
  model->push_back("proj", base);
  peft::hf::LoraConfig config;
  config.r = 4;
  config.lora_alpha = 8;
  config.init = peft::LoRAInit::Random;
  config.target_modules.names = {"proj"};
  peft::hf::add_adapter(*model, "default", config);
  auto* layer = model->named_children()["proj"]->as<peft::LoRALinearImpl>();
  ASSERT_NE(layer, nullptr);
  EXPECT_EQ(layer->lora_A->weight.scalar_type(), at::kBFloat16) << "adapters start in the base's dtype";
  const at::Tensor a_param = layer->lora_A->weight;

  peft::cast_adapter_dtype(*model, "default");
  EXPECT_EQ(layer->lora_A->weight.scalar_type(), at::kFloat);
  EXPECT_EQ(layer->lora_B->weight.scalar_type(), at::kFloat);
  EXPECT_TRUE(a_param.is_same(layer->lora_A->weight)) << "the parameter keeps its identity for the optimizer";
  EXPECT_EQ(base->weight.scalar_type(), at::kBFloat16);

  const auto x = torch::randn({5, 16}).to(at::kBFloat16);
  torch::NoGradGuard g;
  const auto out = model->forward(x);
  EXPECT_EQ(out.scalar_type(), at::kBFloat16);
  const auto term = 2.0 * x.to(at::kFloat).matmul(layer->lora_A->weight.t()).matmul(layer->lora_B->weight.t());
  const auto want = x.matmul(base->weight.t()) + base->bias + term.to(at::kBFloat16);
  EXPECT_LE(max_diff(out.to(at::kFloat), want.to(at::kFloat)), 0.05);
  EXPECT_THAT([&] { peft::cast_adapter_dtype(*model, "default", at::kLong); },
              ThrowsMessage<peft::PeftError>(HasSubstr("Long is not a floating-point dtype")));
}

TEST(MultiAdapter, SaveAdapterWritesTheNamedOne) {
  toy::Toy model = two_adapters();
  TempDir out;
  EXPECT_THAT([&] { peft::hf::save_adapter(*model, out.str()); },
              ThrowsMessage<peft::PeftError>(HasSubstr("several adapters (\"a\", \"b\")")));
  peft::hf::SaveAdapterOptions options;
  options.adapter_name = "b";
  peft::hf::save_adapter(*model, out.str(), options);
  auto saved = ms::SafetensorsFile::open(out / "adapter_model.safetensors");
  auto original = ms::SafetensorsFile::open(kMixed + "/b/adapter_model.safetensors");
  EXPECT_EQ(saved->keys(), original->keys());
  for (const auto& key : original->keys()) EXPECT_TRUE(torch::equal(saved->get(key), original->get(key))) << key;
  const auto config = config_of(out.str());
  EXPECT_TRUE(config.use_rslora);
  EXPECT_EQ(config.r, 4);

  // Loaded alone into a fresh model, the saved "b" computes PEFT's logits_b.
  toy::Toy again = base_model();
  peft::hf::load_adapter(*again, out.str());
  EXPECT_LE(max_diff(logits(again), expected("logits_b")), 1e-5);
}

TEST(MultiAdapter, ErrorsNameTheAdapterAndLeaveTheModelAlone) {
  toy::Toy model = two_adapters();
  const auto before = keys_of(*model);
  EXPECT_THAT([&] { peft::hf::load_adapter(*model, kMixed + "/b", "b"); },
              ThrowsMessage<peft::PeftError>(HasSubstr("already holds an adapter \"b\"; pass another adapter_name")));
  EXPECT_THAT([&] { peft::set_adapter(*model, "c"); },
              ThrowsMessage<peft::PeftError>(HasSubstr("set_adapter: the model has no adapter \"c\"; its "
                                                       "adapters: \"a\", \"b\"")));
  EXPECT_THAT([&] { peft::delete_adapter(*model, "c"); },
              ThrowsMessage<peft::PeftError>(HasSubstr("delete_adapter: the model has no adapter \"c\"")));
  EXPECT_THAT([&] { peft::cast_adapter_dtype(*model, "c"); },
              ThrowsMessage<peft::PeftError>(HasSubstr("cast_adapter_dtype: the model has no adapter \"c\"")));
  EXPECT_THAT([&] { peft::hf::load_adapter(*model, kMixed + "/a", "my.adapter"); },
              ThrowsMessage<peft::PeftError>(HasSubstr("adapter name \"my.adapter\" is not usable")));

  // A third adapter whose weights do not fit: an error, and nothing stays behind.
  TempDir bad;
  fs::copy(kMixed + "/a/adapter_config.json", bad / "adapter_config.json");
  auto file = ms::SafetensorsFile::open(kMixed + "/a/adapter_model.safetensors");
  ms::StateDict partial;
  for (const auto& key : file->keys()) {
    if (key.find("layers.1.") == std::string::npos) partial.emplace(key, file->get(key));
  }
  ms::save_safetensors(bad / "adapter_model.safetensors", partial);
  EXPECT_THAT([&] { peft::hf::load_adapter(*model, bad.str(), "c"); },
              ThrowsMessage<peft::PeftError>(HasSubstr("weights the adapter lacks: layers.1.attention.q_proj")));
  EXPECT_EQ(keys_of(*model), before);
  EXPECT_EQ(peft::adapter_names(*model), (std::vector<std::string>{"a", "b"}));
  EXPECT_LE(max_diff(logits(model), expected("logits_a")), 1e-5);

  // d9d's LoRA on a layer that already holds "default".
  toy::Toy single = base_model();
  peft::LoRA lora({R"(.*q_proj)", peft::LoRAParameters().r(4).alpha(8)});
  peft::inject_peft_and_freeze(lora, single);
  peft::LoRA again({R"(.*\.q_proj)", peft::LoRAParameters().r(2).alpha(2)});
  EXPECT_THAT([&] { peft::inject_peft_and_freeze(again, single); },
              ThrowsMessage<peft::PeftError>(HasSubstr("'layers.0.attention.q_proj' already holds an adapter "
                                                       "\"default\"")));
}
