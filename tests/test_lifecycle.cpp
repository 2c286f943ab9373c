// The whole lifecycle: the Python original's cases, FullTune, stacks, training
// end to end, and the fixture toy transformer loaded through the mapper.
#include "toy_model.h"

#include <d9d/peft.h>

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/optim/sgd.h>
#include <torch/serialize.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

using ::testing::HasSubstr;
namespace peft = d9d::peft;
namespace ms = d9d::model_state;

namespace {

struct OneLayerImpl : torch::nn::Module {
  OneLayerImpl() : fc(register_module("fc", d9d::nn::Linear(torch::nn::LinearOptions(10, 5).bias(false)))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc(x); }
  d9d::nn::Linear fc;
};
TORCH_MODULE(OneLayer);

struct MlpImpl : torch::nn::Module {
  MlpImpl()
      : up(register_module("up", d9d::nn::Linear(8, 32))),
        down(register_module("down", d9d::nn::Linear(32, 8))),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({8})))) {}
  torch::Tensor forward(const torch::Tensor& x) { return down(torch::relu(up(norm(x)))); }
  d9d::nn::Linear up, down;
  torch::nn::LayerNorm norm;
};
TORCH_MODULE(Mlp);

std::map<std::string, std::vector<int64_t>> shapes_of(const torch::nn::Module& m) {
  std::map<std::string, std::vector<int64_t>> out;
  for (const auto& p : m.named_parameters()) out[p.key()] = p.value().sizes().vec();
  return out;
}

std::map<std::string, bool> grad_flags(const torch::nn::Module& m) {
  std::map<std::string, bool> out;
  for (const auto& p : m.named_parameters()) out[p.key()] = p.value().requires_grad();
  return out;
}

ms::StateDict load_pt(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  EXPECT_TRUE(file.good()) << "missing fixture " << path;
  std::vector<char> data((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  ms::StateDict out;
  for (const auto& item : torch::pickle_load(data).toGenericDict()) {
    out.emplace(item.key().toStringRef(), item.value().toTensor());
  }
  return out;
}

}  // namespace

// ------------------------------------------------- the original's cases

TEST(Lifecycle, OriginalNumbers) {
  OneLayer model;
  {
    torch::NoGradGuard g;
    model->fc->weight.fill_(1.0f);
  }
  peft::LoRA lora({"fc", peft::LoRAParameters().r(2).alpha(4)});
  peft::inject_peft_and_freeze(lora, model);
  auto wrapper = model->named_children()["fc"]->as<peft::LoRALinearImpl>();
  ASSERT_NE(wrapper, nullptr);
  {
    torch::NoGradGuard g;
    wrapper->lora_A->weight.fill_(0.5f);
    wrapper->lora_B->weight.fill_(0.1f);
  }
  auto x = torch::ones({10});
  EXPECT_TRUE(torch::allclose(model->forward(x), torch::full({5}, 12.0f)));
  peft::merge_peft(lora, model);
  EXPECT_TRUE(torch::allclose(model->forward(x), torch::full({5}, 12.0f)));
  EXPECT_TRUE(torch::allclose(model->fc->weight, torch::full({5, 10}, 1.2f)));
  EXPECT_EQ(model->named_children()["fc"].get(), model->fc.get());
}

TEST(Lifecycle, EndToEndTraining) {
  torch::manual_seed(0);
  Mlp model;
  const auto original_shapes = shapes_of(*model);
  auto x = torch::randn({64, 8});
  auto target = 3.0 * torch::tanh(x.matmul(torch::randn({8, 8})));
  auto loss_of = [&] { return torch::mse_loss(model->forward(x), target); };

  const float loss_before = loss_of().item<float>();
  peft::LoRA lora({"up|down", peft::LoRAParameters().r(4).alpha(8)});
  peft::inject_peft_and_freeze(lora, model);
  EXPECT_EQ(loss_of().item<float>(), loss_before) << "injection must not change the output";

  torch::optim::SGD opt(peft::trainable_parameters(*model), torch::optim::SGDOptions(0.05));
  for (int step = 0; step < 100; ++step) {
    opt.zero_grad();
    auto loss = loss_of();
    loss.backward();
    opt.step();
  }
  const float loss_trained = loss_of().item<float>();
  EXPECT_LE(loss_trained, loss_before - 0.5f) << "before " << loss_before << " after " << loss_trained;
  EXPECT_FALSE(model->up->weight.grad().defined()) << "frozen weights get no gradient";

  peft::merge_peft(lora, model);
  EXPECT_NEAR(loss_of().item<float>(), loss_trained, 1e-5);
  EXPECT_EQ(shapes_of(*model), original_shapes);
}

// ---------------------------------------------------------------- FullTune

TEST(FullTune, TrainsOnlyMatchingModules) {
  Mlp model;
  peft::FullTune full({".*norm.*"});
  auto mapper = peft::inject_peft_and_freeze(full, model);
  EXPECT_EQ(grad_flags(*model), (std::map<std::string, bool>{{"up.weight", false},
                                                             {"up.bias", false},
                                                             {"down.weight", false},
                                                             {"down.bias", false},
                                                             {"norm.weight", true},
                                                             {"norm.bias", true}}));
  EXPECT_EQ(mapper->state_dependency_groups(), ms::identity_mapper_from_module(*model)->state_dependency_groups());
  EXPECT_NO_THROW(peft::merge_peft(full, model));
}

TEST(FullTune, ErrorsNameThePattern) {
  torch::nn::Sequential seq(d9d::nn::Linear(2, 2), torch::nn::ReLU());
  peft::FullTune nothing({"head"});
  EXPECT_THAT([&] { peft::inject_peft_and_freeze(nothing, *seq); },
              ::testing::ThrowsMessage<peft::PeftError>(
                  HasSubstr("FullTune: module_name_pattern \"head\" matches no module; it must match the whole "
                            "qualified name, and modules here are named like '0', '1'")));
  peft::FullTune no_params({"1"});
  EXPECT_THAT([&] { peft::inject_peft_and_freeze(no_params, *seq); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("matches '1', which hold no parameters")));
}

// ------------------------------------------------------------------ stacks

TEST(Stack, NestedStacksApplyInOrderAndMergeInReverse) {
  Mlp model;
  const auto original_shapes = shapes_of(*model);
  auto config = peft::parse_peft_config(
      R"({"kind":"stack","methods":[{"kind":"stack","methods":[{"kind":"lora","module_name_pattern":"up",)"
      R"("params":{"r":2,"alpha":2,"dropout":0.0}}]},{"kind":"full_tune","module_name_pattern":"norm"},)"
      R"({"kind":"lora","module_name_pattern":"down","params":{"r":3,"alpha":6,"dropout":0.0}}]})");
  auto method = peft::peft_method_from_config(config);
  auto mapper = peft::inject_peft_and_freeze(*method, model);
  EXPECT_EQ(grad_flags(*model), (std::map<std::string, bool>{{"up.base.weight", false},
                                                             {"up.base.bias", false},
                                                             {"up.lora_A.weight", true},
                                                             {"up.lora_B.weight", true},
                                                             {"down.base.weight", false},
                                                             {"down.base.bias", false},
                                                             {"down.lora_A.weight", true},
                                                             {"down.lora_B.weight", true},
                                                             {"norm.weight", true},
                                                             {"norm.bias", true}}));
  EXPECT_EQ(mapper->state_dependency_groups(), (ms::StateGroups{{{"up.weight"}, {"up.base.weight"}},
                                                                {{"up.bias"}, {"up.base.bias"}},
                                                                {{"down.weight"}, {"down.base.weight"}},
                                                                {{"down.bias"}, {"down.base.bias"}},
                                                                {{"norm.weight"}, {"norm.weight"}},
                                                                {{"norm.bias"}, {"norm.bias"}}}));
  auto down = model->named_children()["down"]->as<peft::LoRALinearImpl>();
  ASSERT_NE(down, nullptr);
  EXPECT_DOUBLE_EQ(down->scale(), 2.0);
  peft::merge_peft(*method, model);
  EXPECT_EQ(shapes_of(*model), original_shapes);
  EXPECT_NE(model->named_children()["up"]->as<d9d::nn::LinearImpl>(), nullptr);
}

TEST(Stack, AFailingMethodRollsBackTheOnesBefore) {
  Mlp model;
  const auto weight = model->up->weight.clone();
  std::vector<std::unique_ptr<peft::PeftMethodBase>> methods;
  methods.push_back(std::make_unique<peft::LoRA>(peft::LoRAConfig{"up", peft::LoRAParameters().r(2).alpha(2)}));
  methods.push_back(std::make_unique<peft::LoRA>(peft::LoRAConfig{"nothing", peft::LoRAParameters().r(2).alpha(2)}));
  peft::PeftStack stack(std::move(methods));
  EXPECT_THROW(peft::inject_peft_and_freeze(stack, model), peft::PeftError);
  EXPECT_EQ(model->named_children()["up"].get(), model->up.get());
  EXPECT_FALSE(model->up->has_override());
  EXPECT_TRUE(torch::equal(model->up->weight, weight));
  EXPECT_TRUE(model->up->weight.requires_grad());
}

TEST(Stack, EmptyOrNullMethodsAreErrors) {
  EXPECT_THAT([] { peft::PeftStack(std::vector<std::unique_ptr<peft::PeftMethodBase>>{}); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("the method list is empty")));
}

// ------------------------------------------------ loading after injection

TEST(Lifecycle, MapperComposesAfterAnotherMapper) {
  Mlp model;
  ms::StateDict ckpt;
  for (const auto& item : ms::module_state_dict(*model)) ckpt["model." + item.first] = item.second.clone();
  peft::LoRA lora({"up", peft::LoRAParameters().r(2).alpha(2)});
  auto peft_mapper = peft::inject_peft_and_freeze(lora, model);
  std::vector<ms::MapperPtr> strip;
  for (const auto& item : ckpt) strip.push_back(std::make_shared<ms::Rename>(item.first, item.first.substr(6)));
  ms::Sequential chain({std::make_shared<ms::Parallel>(strip), peft_mapper});
  auto report = ms::load_state_dict(*model, ckpt, chain);
  EXPECT_TRUE(report.ok()) << report.to_string();
  EXPECT_TRUE(torch::equal(model->up->weight, ckpt.at("model.up.weight")));
}

TEST(Lifecycle, ToyTransformerLoadsTheOriginalCheckpointThroughTheMapper) {
  const ms::StateDict state = load_pt(std::string(D9D_FIXTURES_DIR) + "/hf_peft/toy/model.pt");
  ASSERT_EQ(state.size(), 24u);

  toy::Toy plain;
  EXPECT_TRUE(ms::load_state_dict(*plain, state).ok());

  toy::Toy model;
  peft::LoRA lora({R"(layers\.\d+\.(attention\.\w+_proj|mlp\.(up|down)_proj))", peft::LoRAParameters().r(4).alpha(8)});
  auto mapper = peft::inject_peft_and_freeze(lora, model);
  auto report = ms::load_state_dict(*model, state, *mapper);
  EXPECT_TRUE(report.ok()) << report.to_string();
  EXPECT_EQ(report.loaded_keys.size(), 24u);
  EXPECT_EQ(model->named_parameters().size(), 24u + 2u * 12u);

  auto ids = torch::randint(0, 37, {2, 7}, torch::kLong);
  EXPECT_TRUE(torch::allclose(model->forward(ids), plain->forward(ids), 1e-6, 1e-6));
  auto q = model->layers[0]->as<toy::LayerImpl>()->attention->q_proj;
  EXPECT_TRUE(torch::equal(q->weight, state.at("layers.0.attention.q_proj.weight")));
}
