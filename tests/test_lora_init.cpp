// LoRA's PiSSA and OLoRA initialisations: the factors, the residual base
// weight, loading, deleting, disabling, merging and saving. The numbers
// against real PEFT are in peft_reference/init_reference.py.
#include "test_util.h"
#include "toy_model.h"

#include <d9d/peft.h>

#include <torch/nn/functional/loss.h>
#include <torch/optim/adamw.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::HasSubstr;
using namespace d9d_test;

namespace {

const std::string kMlp = ".*mlp\\.(up|down)_proj";

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

at::Tensor logits(toy::Toy& model, const at::Tensor& ids) {
  torch::NoGradGuard g;
  return model->forward(ids);
}

toy::Toy seeded_model(uint64_t seed) {
  torch::manual_seed(seed);
  toy::Toy model;
  model->eval();
  return model;
}

peft::LoRALinearImpl& layer_at(torch::nn::Module& model, const std::string& name) {
  auto* layer = model.named_modules()[name]->as<peft::LoRALinearImpl>();
  if (!layer) throw std::runtime_error(name + " is no LoRALinear");
  return *layer;
}

const std::string kUp = "layers.0.mlp.up_proj";

}  // namespace

TEST(LoRAInit, PiSSATakesTheTopSingularPartAndLeavesTheResidual) {
  toy::Toy model = seeded_model(1);
  const at::Tensor ids = torch::randint(0, 37, {2, 7});
  const at::Tensor W = model->named_parameters()[kUp + ".weight"].detach().clone();  // [40, 16]
  const at::Tensor before = logits(model, ids);
  peft::LoRA lora({kMlp, peft::LoRAParameters().r(4).alpha(8).init(peft::LoRAInit::PiSSA)});
  peft::inject_peft_and_freeze(lora, model);
  EXPECT_LE(max_diff(logits(model, ids), before), 1e-5) << "the output is the base model's";

  auto& layer = layer_at(*model, kUp);
  const at::Tensor A = layer.lora_A->weight.detach(), B = layer.lora_B->weight.detach();
  const at::Tensor residual = layer.base_weight().detach();
  EXPECT_LE(max_diff(residual + 2.0 * B.matmul(A), W), 1e-5);
  // Independent of the factors' signs: the adapter holds W's four largest
  // singular values, the residual the other twelve.
  const at::Tensor s = at::linalg_svdvals(W);
  EXPECT_LE(max_diff(at::linalg_svdvals(2.0 * B.matmul(A)).narrow(0, 0, 4), s.narrow(0, 0, 4)), 1e-5);
  EXPECT_LE(max_diff(at::linalg_svdvals(residual).narrow(0, 0, 12), s.narrow(0, 4, 12)), 1e-5);
  // A's rows and B's columns share the same norms: sqrt(S / scale) each.
  EXPECT_LE(max_diff(A.norm(2, {1}), B.norm(2, {0})), 1e-5);
  EXPECT_LE(max_diff(A.norm(2, {1}), (s.narrow(0, 0, 4) / 2.0).sqrt()), 1e-5);
}

TEST(LoRAInit, OLoRATakesTheFirstColumnsOfQR) {
  toy::Toy model = seeded_model(2);
  const at::Tensor ids = torch::randint(0, 37, {2, 7});
  const at::Tensor W = model->named_parameters()[kUp + ".weight"].detach().clone();
  const at::Tensor before = logits(model, ids);
  peft::LoRA lora({kMlp, peft::LoRAParameters().r(3).alpha(12).init(peft::LoRAInit::OLoRA)});
  peft::inject_peft_and_freeze(lora, model);
  EXPECT_LE(max_diff(logits(model, ids), before), 1e-5);
  auto& layer = layer_at(*model, kUp);
  const at::Tensor A = layer.lora_A->weight.detach(), B = layer.lora_B->weight.detach();
  EXPECT_LE(max_diff(B.t().matmul(B), torch::eye(3)), 1e-5) << "B's columns are orthonormal";
  EXPECT_EQ(A.tril(-1).abs().max().item<double>(), 0.0) << "A is R's first rows: upper triangular";
  // The first r columns of W lie in the span of B: W[:, :r] = B A[:, :r].
  EXPECT_LE(max_diff(B.matmul(A).narrow(1, 0, 3), W.narrow(1, 0, 3)), 1e-5);
  EXPECT_LE(max_diff(layer.base_weight().detach() + 4.0 * B.matmul(A), W), 1e-5);
}

TEST(LoRAInit, InjectedBeforeLoadingTheInitialisationFollowsTheLoadedWeights) {
  toy::Toy original = seeded_model(3);
  const auto checkpoint = ms::module_state_dict(*original);
  const at::Tensor ids = torch::randint(0, 37, {2, 7});
  toy::Toy model = seeded_model(99);  // other weights: the checkpoint replaces them
  peft::LoRA lora({kMlp, peft::LoRAParameters().r(4).alpha(8).init(peft::LoRAInit::PiSSA)});
  auto mapper = peft::inject_peft_and_freeze(lora, model);
  const at::Tensor A_before_load = layer_at(*model, kUp).lora_A->weight.detach().clone();
  ms::load_state_dict(*model, checkpoint, *mapper, quiet());
  EXPECT_LE(max_diff(logits(model, ids), logits(original, ids)), 1e-5);
  auto& layer = layer_at(*model, kUp);
  EXPECT_GT(max_diff(layer.lora_A->weight.detach(), A_before_load), 1e-3) << "redone from the loaded weight";
  EXPECT_LE(max_diff(layer.base_weight().detach() + 2.0 * layer.lora_B->weight.matmul(layer.lora_A->weight).detach(),
                     checkpoint.at(kUp + ".weight")),
            1e-5);
}

TEST(LoRAInit, DeletingDisablingAndUnwrappingGiveTheOriginalBase) {
  toy::Toy model = seeded_model(4);
  const at::Tensor ids = torch::randint(0, 37, {2, 7});
  const at::Tensor W = model->named_parameters()[kUp + ".weight"].detach().clone();
  const at::Tensor base = logits(model, ids);
  peft::LoRA lora({kMlp, peft::LoRAParameters().r(4).alpha(8).init(peft::LoRAInit::PiSSA)});
  peft::inject_peft_and_freeze(lora, model);
  {
    torch::NoGradGuard g;
    for (auto& p : model->parameters()) {
      if (p.requires_grad()) p.mul_(1.5);  // trained
    }
  }
  const at::Tensor adapted = logits(model, ids);
  ASSERT_GT(max_diff(adapted, base), 1e-3);
  {
    peft::DisableAdapters off(*model);
    EXPECT_LE(max_diff(logits(model, ids), base), 1e-5) << "disabled: the original base, not the residual";
  }
  EXPECT_LE(max_diff(logits(model, ids), adapted), 1e-6);
  peft::delete_adapter(*model, peft::kDefaultAdapterName);
  EXPECT_LE(max_diff(model->named_parameters()[kUp + ".weight"].detach(), W), 1e-5);
  EXPECT_LE(max_diff(logits(model, ids), base), 1e-5);
}

TEST(LoRAInit, MergedEqualsUnmergedAndIsTheTrainedChangeOnTheOriginal) {
  toy::Toy model = seeded_model(5);
  const at::Tensor ids = torch::randint(0, 37, {4, 9});
  const at::Tensor W = model->named_parameters()[kUp + ".weight"].detach().clone();
  peft::LoRA lora({kMlp, peft::LoRAParameters().r(4).alpha(8).init(peft::LoRAInit::OLoRA)});
  peft::inject_peft_and_freeze(lora, model);
  auto& layer = layer_at(*model, kUp);
  const at::Tensor A0 = layer.lora_A->weight.detach().clone(), B0 = layer.lora_B->weight.detach().clone();
  model->train();
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-2));
  const at::Tensor target = torch::randint(0, 37, {4, 9});
  double first = 0, last = 0;
  for (int step = 0; step < 5; ++step) {
    opt.zero_grad();
    const auto loss = torch::nn::functional::cross_entropy(model->forward(ids).reshape({-1, 37}), target.reshape(-1));
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  EXPECT_LT(last, first);
  model->eval();
  const at::Tensor unmerged = logits(model, ids);
  const at::Tensor A = layer.lora_A->weight.detach().clone(), B = layer.lora_B->weight.detach().clone();
  peft::merge_peft(lora, *model);
  EXPECT_LE(max_diff(logits(model, ids), unmerged), 1e-5);
  EXPECT_LE(max_diff(model->named_parameters()[kUp + ".weight"].detach(), W + 2.0 * (B.matmul(A) - B0.matmul(A0))), 1e-5);
}

TEST(LoRAInit, SavedAsPiSSAOrConvertedBothLoadOntoTheOriginal) {
  toy::Toy original = seeded_model(6);
  const auto checkpoint = ms::module_state_dict(*original);
  const at::Tensor ids = torch::randint(0, 37, {2, 7});
  toy::Toy model = seeded_model(6);
  peft::LoRA lora({kMlp, peft::LoRAParameters().r(4).alpha(8).init(peft::LoRAInit::PiSSA)});
  peft::inject_peft_and_freeze(lora, model);
  {
    torch::NoGradGuard g;
    for (auto& p : model->parameters()) {
      if (p.requires_grad()) p.add_(0.1 * torch::randn_like(p));
    }
  }
  const at::Tensor trained = logits(model, ids);
  TempDir dir;
  peft::hf::save_adapter(*model, (dir.path / "pissa").string());
  peft::hf::SaveAdapterOptions convert;
  convert.convert_to_lora = true;
  peft::hf::save_adapter(*model, (dir.path / "lora").string(), convert);

  std::ifstream pissa_config(dir.path / "pissa" / "adapter_config.json"), lora_config(dir.path / "lora" / "adapter_config.json");
  const auto p = nlohmann::json::parse(pissa_config), l = nlohmann::json::parse(lora_config);
  EXPECT_EQ(p.at("init_lora_weights"), "pissa");
  EXPECT_EQ(p.at("r"), 4);
  EXPECT_EQ(l.at("init_lora_weights"), true);
  EXPECT_EQ(l.at("r"), 8);
  EXPECT_EQ(l.at("lora_alpha"), 16);

  for (const std::string form : {"pissa", "lora"}) {
    toy::Toy fresh = seeded_model(7);
    ms::load_state_dict(*fresh, checkpoint, *ms::identity_mapper_from_module(*fresh), quiet());
    peft::hf::load_adapter(*fresh, (dir.path / form).string());
    EXPECT_LE(max_diff(logits(fresh, ids), trained), 1e-5) << form;
  }
}

TEST(LoRAInit, RefusalsNameTheLayerOrField) {
  toy::Toy model = seeded_model(8);
  const auto weights = ms::module_state_dict(*model);
  auto expect_error = [&](const std::function<void()>& action, const std::vector<std::string>& parts) {
    try {
      action();
      ADD_FAILURE() << "no error; expected: " << parts.front();
    } catch (const std::exception& e) {
      for (const auto& part : parts) EXPECT_THAT(e.what(), HasSubstr(part));
    }
    const auto now = ms::module_state_dict(*model);
    ASSERT_EQ(now.size(), weights.size()) << "the model was left changed";
    for (const auto& [k, v] : weights) EXPECT_TRUE(now.at(k).equal(v)) << k;
  };
  // A rank above the weight's: refused before anything changes.
  expect_error([&] {
    peft::LoRA big({".*attention\\.q_proj", peft::LoRAParameters().r(17).alpha(8).init(peft::LoRAInit::PiSSA)});
    peft::inject_peft_and_freeze(big, model);
  }, {"rank r = 17 from a [16, 16] weight", "r <= 16", "'layers.0.attention.q_proj'"});
  // Embeddings have no weight matrix to decompose.
  expect_error([&] {
    peft::LoRA emb({"embed_tokens", peft::LoRAParameters().r(2).alpha(8).init(peft::LoRAInit::OLoRA)});
    peft::inject_peft_and_freeze(emb, model);
  }, {"the olora initialisation is for Linear layers", "'embed_tokens'"});
  // A second adapter next to a PiSSA one.
  peft::LoRA pissa({kMlp, peft::LoRAParameters().r(2).alpha(8).init(peft::LoRAInit::PiSSA)});
  peft::inject_peft_and_freeze(pissa, model);
  try {
    peft::hf::LoraConfig config;
    config.target_modules.names = {"up_proj"};
    peft::hf::add_adapter(*model, "other", config);
    ADD_FAILURE() << "a second adapter shared a PiSSA layer";
  } catch (const peft::PeftError& e) {
    EXPECT_THAT(e.what(), HasSubstr("holds adapter \"default\", and a pissa adapter changes the base weight"));
    EXPECT_THAT(e.what(), HasSubstr("convert_to_lora"));
  }
  EXPECT_EQ(peft::adapter_names(*model), std::vector<std::string>{"default"});
  // Configs.
  EXPECT_THAT([] { d9d::peft::parse_peft_config(R"({"kind":"lora","module_name_pattern":"x",)"
                                                R"("params":{"r":8,"alpha":8,"dropout":0,"init":"pissa_niter_0"}})"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.init: \"pissa_niter_0\" is not an initialisation")));
  const auto c = d9d::peft::parse_peft_config(
      R"({"kind":"lora","module_name_pattern":"x","params":{"r":8,"alpha":8,"dropout":0,"init":"pissa_niter_3"}})");
  EXPECT_EQ(c.get<peft::LoRAConfig>().params.init(), peft::LoRAInit::PiSSA);
  EXPECT_EQ(c.get<peft::LoRAConfig>().params.pissa_niter(), 3);
  EXPECT_THAT([] { peft::hf::parse_lora_config(nlohmann::json::parse(R"({"r":4,"target_modules":["q"],)"
                                                                      R"("init_lora_weights":"pissa_niter_x"})"), "cfg"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("init_lora_weights")));
  EXPECT_EQ(peft::hf::parse_lora_config(nlohmann::json::parse(R"({"r":4,"target_modules":["q"],"init_lora_weights":"olora"})"),
                                        "cfg").init,
            peft::LoRAInit::OLoRA);
}

namespace {

struct LinearAndTypedImpl : torch::nn::Module {
  LinearAndTypedImpl() : a(register_module("a", d9d::nn::Linear(6, 6))), b(register_module("b", torch::nn::Linear(6, 6))) {}
  torch::Tensor forward(const torch::Tensor& x) { return b(a(x)); }
  d9d::nn::Linear a;
  torch::nn::Linear b;  // a typed member: calls to it cannot be redirected
};
TORCH_MODULE(LinearAndTyped);

}  // namespace

TEST(LoRAInit, APlanThatFailsAfterBuildingAPissaLayerPutsItsBaseBack) {
  // 'a' is built (its base becomes the residual) before 'b' is refused; the
  // failed injection must give 'a' its weight back and leave it unwrapped.
  torch::manual_seed(9);
  LinearAndTyped model;
  const auto w = model->a->weight.detach().clone(), wb = model->b->weight.detach().clone();
  const auto x = torch::randn({3, 6});
  const auto before = model->forward(x).detach();
  peft::LoRA pissa({"a|b", peft::LoRAParameters().r(2).alpha(4).init(peft::LoRAInit::PiSSA)});
  EXPECT_THAT([&] { peft::inject_peft_and_freeze(pissa, model); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("cannot adapt 'b'")));
  EXPECT_LE(max_diff(model->a->weight, w), 1e-6) << "the residual was put back";
  EXPECT_LE(max_diff(model->b->weight, wb), 1e-6) << "'b' was built too, before its refusal";
  EXPECT_FALSE(model->a->has_override());
  EXPECT_TRUE(peft::adapter_names(*model).empty());
  torch::NoGradGuard g;
  EXPECT_LE(max_diff(model->forward(x), before), 1e-5);
}
