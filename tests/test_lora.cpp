// d9d::nn::Linear, the LoRA layer and method on models written the LibTorch way.
#include <d9d/peft.h>

#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/init.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

using ::testing::HasSubstr;
namespace peft = d9d::peft;

namespace {

/// Two adaptable projections, one biased, and a norm, held by typed members.
struct BlockImpl : torch::nn::Module {
  BlockImpl()
      : q(register_module("q", d9d::nn::Linear(torch::nn::LinearOptions(4, 4).bias(false)))),
        k(register_module("k", d9d::nn::Linear(4, 3))),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({4})))) {}
  torch::Tensor forward(const torch::Tensor& x) { return k(q(norm(x))); }
  d9d::nn::Linear q;
  d9d::nn::Linear k;
  torch::nn::LayerNorm norm;
};
TORCH_MODULE(Block);

/// A plain torch::nn::Linear held by a typed member: cannot be adapted.
struct PlainImpl : torch::nn::Module {
  PlainImpl() : fc(register_module("fc", torch::nn::Linear(4, 4))) {}
  torch::nn::Linear fc;
};
TORCH_MODULE(Plain);

std::vector<std::string> keys_of(const torch::nn::Module& m) {
  auto keys = m.named_parameters().keys();
  return {keys.begin(), keys.end()};
}

void fill_adapters(peft::LoRALinearImpl& lora, float a, float b) {
  torch::NoGradGuard g;
  lora.lora_A->weight.fill_(a);
  lora.lora_B->weight.fill_(b);
}

}  // namespace

// ------------------------------------------------------- d9d::nn::Linear

TEST(Linear, MatchesTorchLinearExactly) {
  torch::manual_seed(7);
  torch::nn::Linear reference(torch::nn::LinearOptions(5, 3));
  torch::manual_seed(7);
  d9d::nn::Linear ours(torch::nn::LinearOptions(5, 3));
  EXPECT_TRUE(torch::equal(reference->weight, ours->weight));
  EXPECT_TRUE(torch::equal(reference->bias, ours->bias));
  EXPECT_EQ(keys_of(*reference), keys_of(*ours));
  auto x = torch::randn({2, 5});
  EXPECT_TRUE(torch::equal(reference(x), ours(x)));

  d9d::nn::Linear no_bias(torch::nn::LinearOptions(5, 3).bias(false));
  EXPECT_EQ(keys_of(*no_bias), std::vector<std::string>{"weight"});
  std::ostringstream s;
  s << *no_bias;
  EXPECT_EQ(s.str(), "d9d::nn::Linear(in_features=5, out_features=3, bias=false)");
}

TEST(Linear, CloneIsAPlainIndependentLayer) {
  d9d::nn::Linear a(3, 2);
  auto b = std::dynamic_pointer_cast<d9d::nn::LinearImpl>(a->clone());
  ASSERT_NE(b, nullptr);
  EXPECT_FALSE(b->has_override());
  EXPECT_TRUE(torch::equal(a->weight, b->weight));
  EXPECT_FALSE(a->weight.is_same(b->weight));
}

// ---------------------------------------------------------------- layer

TEST(LoRALayer, InitialisesLikeTheOriginal) {
  d9d::nn::Linear base(torch::nn::LinearOptions(6, 5).bias(false));
  peft::LoRALinearImpl lora(base.ptr(), peft::LoRAParameters().r(3).alpha(6));
  EXPECT_EQ(lora.lora_A->weight.sizes(), (std::vector<int64_t>{3, 6}));
  EXPECT_EQ(lora.lora_B->weight.sizes(), (std::vector<int64_t>{5, 3}));
  EXPECT_TRUE(torch::equal(lora.lora_B->weight, torch::zeros({5, 3})));
  // kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
  EXPECT_LE(lora.lora_A->weight.abs().max().item<float>(), 1.0f / std::sqrt(6.0f));
  EXPECT_GT(lora.lora_A->weight.abs().max().item<float>(), 0.0f);
  EXPECT_DOUBLE_EQ(lora.scale(), 2.0);
  EXPECT_EQ(keys_of(lora), (std::vector<std::string>{"base.weight", "lora_A.weight", "lora_B.weight"}));
}

TEST(LoRALayer, ForwardIsBasePlusScaledLowRank) {
  d9d::nn::Linear base(4, 3);
  peft::LoRALinearImpl lora(base.ptr(), peft::LoRAParameters().r(2).alpha(6));
  torch::NoGradGuard g;
  lora.lora_B->weight.normal_();
  auto x = torch::randn({5, 4});
  auto expected = x.matmul(base->weight.t()) + base->bias +
                  3.0 * x.matmul(lora.lora_A->weight.t()).matmul(lora.lora_B->weight.t());
  EXPECT_TRUE(torch::allclose(lora.forward(x), expected, 1e-5, 1e-6));
}

TEST(LoRALayer, AdaptersFollowTheBaseDtype) {
  d9d::nn::Linear base(4, 3);
  base->to(torch::kDouble);
  peft::LoRALinearImpl lora(base.ptr(), peft::LoRAParameters().r(2).alpha(4));
  EXPECT_EQ(lora.lora_A->weight.scalar_type(), torch::kDouble);
  EXPECT_EQ(lora.lora_B->weight.scalar_type(), torch::kDouble);
  EXPECT_EQ(lora.forward(torch::ones({1, 4}, torch::kDouble)).scalar_type(), torch::kDouble);
}

TEST(LoRALayer, DropoutAppliesToTheAdapterInputOnlyInTraining) {
  d9d::nn::Linear base(16, 16);
  peft::LoRALinearImpl lora(base.ptr(), peft::LoRAParameters().r(4).alpha(4).dropout(0.5));
  {
    torch::NoGradGuard g;
    lora.lora_B->weight.normal_();
  }
  auto x = torch::randn({8, 16});
  lora.train();
  torch::manual_seed(1);
  auto a = lora.forward(x);
  torch::manual_seed(2);
  auto b = lora.forward(x);
  EXPECT_FALSE(torch::allclose(a, b)) << "dropout must randomise the adapter path while training";
  lora.eval();
  auto expected = base->forward_base(x) + x.matmul(lora.lora_A->weight.t()).matmul(lora.lora_B->weight.t());
  EXPECT_TRUE(torch::allclose(lora.forward(x), expected, 1e-5, 1e-5));
}

TEST(LoRALayer, CpuDropoutDropsAtRateAndScalesTheRest) {
  d9d::nn::Linear base(torch::nn::LinearOptions(256, 8).bias(false));
  peft::LoRALinearImpl lora(base.ptr(), peft::LoRAParameters().r(4).alpha(4).dropout(0.25));
  {
    torch::NoGradGuard g;
    lora.lora_A->weight.zero_();
    lora.lora_A->weight.select(1, 0).fill_(1.0f);  // A picks the first input feature
    lora.lora_B->weight.fill_(1.0f);
  }
  lora.train();
  // Input: feature 0 is 1, the rest 0; so the adapter output shows whether
  // feature 0 survived dropout (scaled by 1/(1-p)) or not, row by row.
  auto x = torch::zeros({20000, 256});
  x.select(1, 0).fill_(1.0f);
  torch::manual_seed(3);
  auto delta = (lora.forward(x) - base->forward_base(x)).select(1, 0) / (4.0 * 1.0);  // r rows of A, scale 1
  const auto kept = delta.gt(0.5);
  const double kept_fraction = kept.to(torch::kDouble).mean().item<double>();
  EXPECT_NEAR(kept_fraction, 0.75, 0.015);
  EXPECT_TRUE(torch::allclose(delta.masked_select(kept), torch::full({kept.sum().item<int64_t>()}, 1.0f / 0.75f)));
  EXPECT_TRUE(torch::allclose(delta.masked_select(kept.logical_not()), torch::zeros({1})));
  torch::manual_seed(3);
  auto again = (lora.forward(x) - base->forward_base(x)).select(1, 0) / 4.0;
  EXPECT_TRUE(torch::equal(again, delta)) << "torch::manual_seed makes the mask reproducible";
  // Gradients flow to A and B through the mask.
  lora.forward(x).sum().backward();
  EXPECT_GT(lora.lora_B->weight.grad().abs().sum().item<float>(), 0.0f);
}

TEST(LoRALayer, CpuDropoutBackwardUsesTheForwardsMask) {
  // Base zero, A = B = identity, scale 1: the layer's output is the dropped
  // input itself, so it shows the mask; the input gradient must be the same
  // mask times 1/(1-p), element by element.
  const int64_t n = 64;
  d9d::nn::Linear base(torch::nn::LinearOptions(n, n).bias(false));
  peft::LoRALinearImpl lora(base.ptr(), peft::LoRAParameters().r(n).alpha(static_cast<double>(n)).dropout(0.3));
  {
    torch::NoGradGuard g;
    base->weight.zero_();
    lora.lora_A->weight.copy_(torch::eye(n));
    lora.lora_B->weight.copy_(torch::eye(n));
  }
  lora.train();
  auto x = (torch::rand({33, n}) + 0.5).requires_grad_(true);
  auto y = lora.forward(x);
  y.sum().backward();
  const auto kept = y.detach().ne(0);
  const float keep = 1.0f / 0.7f;
  EXPECT_TRUE(torch::allclose(y.detach(), x.detach() * kept * keep, 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(x.grad(), kept.to(torch::kFloat) * keep, 1e-5, 1e-5));
  // 2112 draws at rate 0.7: one standard deviation of the kept fraction is
  // 0.010. A CI run once drew 0.7325 (3.3 sigma), above the old 0.03 bound;
  // 0.05 is 5 sigma.
  EXPECT_NEAR(kept.to(torch::kDouble).mean().item<double>(), 0.7, 0.05);
  // A non-contiguous input is dropped the same way as its contiguous copy.
  auto xt = torch::rand({n, 17}).t();
  torch::manual_seed(9);
  const auto from_view = lora.forward(xt);
  torch::manual_seed(9);
  EXPECT_TRUE(torch::equal(from_view, lora.forward(xt.contiguous())));
}

// ---------------------------------------------------- method: structure

TEST(LoRAMethod, WrapsTypedMembersAndRoutesTheirCalls) {
  Block block;
  auto q_impl = block->q.ptr();
  peft::LoRA lora({"q|k", peft::LoRAParameters().r(2).alpha(4)});
  auto mapper = peft::inject_peft_and_freeze(lora, block);

  auto q_wrapper = block->named_children()["q"]->as<peft::LoRALinearImpl>();
  ASSERT_NE(q_wrapper, nullptr);
  EXPECT_EQ(q_wrapper->base().get(), q_impl.get()) << "the typed member's layer becomes the wrapper's base";
  EXPECT_TRUE(q_impl->has_override());

  // Calls through the parent's typed member now include the adapter.
  fill_adapters(*q_wrapper, 0.5f, 0.1f);
  auto x = torch::randn({2, 4});
  auto h = block->norm(x);
  auto q_out = h.matmul(q_impl->weight.t()) + 2.0 * h.matmul(q_wrapper->lora_A->weight.t()).matmul(
                                                        q_wrapper->lora_B->weight.t());
  auto k_impl = block->k.ptr();
  EXPECT_TRUE(torch::allclose(block->forward(x), k_impl->forward_base(q_out), 1e-5, 1e-6));
}

TEST(LoRAMethod, InjectedLayersKeepTheModelsTrainingMode) {
  // A model in eval mode must stay deterministic after injection: the new
  // wrappers (LibTorch modules start in training mode) take the adapted
  // layer's mode, so dropout stays off until train() is called.
  Block block;
  block->eval();
  peft::LoRA lora({"q|k", peft::LoRAParameters().r(2).alpha(4).dropout(0.5)});
  peft::inject_peft_and_freeze(lora, block);
  for (const auto& m : block->modules()) EXPECT_FALSE(m->is_training()) << m->name();
  auto q_wrapper = block->named_children()["q"]->as<peft::LoRALinearImpl>();
  fill_adapters(*q_wrapper, 0.5f, 0.1f);
  const auto x = torch::randn({64, 4});
  EXPECT_TRUE(torch::equal(block->forward(x), block->forward(x)));
  block->train();
  EXPECT_FALSE(torch::equal(block->forward(x), block->forward(x))) << "dropout 0.5 in training mode";
}

TEST(LoRAMethod, FreezesEverythingButTheAdapters) {
  Block block;
  peft::LoRA lora({"q|k", peft::LoRAParameters().r(2).alpha(4)});
  peft::inject_peft_and_freeze(lora, block);
  std::map<std::string, bool> flags;
  for (const auto& p : block->named_parameters()) flags[p.key()] = p.value().requires_grad();
  EXPECT_EQ(flags, (std::map<std::string, bool>{{"q.base.weight", false},
                                                {"q.lora_A.weight", true},
                                                {"q.lora_B.weight", true},
                                                {"k.base.weight", false},
                                                {"k.base.bias", false},
                                                {"k.lora_A.weight", true},
                                                {"k.lora_B.weight", true},
                                                {"norm.weight", false},
                                                {"norm.bias", false}}));
  EXPECT_EQ(peft::trainable_parameters(*block).size(), 4u);
}

TEST(LoRAMethod, MapperGroupsAreExactlyTheRenamesPlusIdentities) {
  Block block;
  peft::LoRA lora({"q|k", peft::LoRAParameters().r(2).alpha(4)});
  auto mapper = peft::inject_peft_and_freeze(lora, block);
  EXPECT_EQ(mapper->state_dependency_groups(), (d9d::model_state::StateGroups{
                                                   {{"q.weight"}, {"q.base.weight"}},
                                                   {{"k.weight"}, {"k.base.weight"}},
                                                   {{"k.bias"}, {"k.base.bias"}},
                                                   {{"norm.weight"}, {"norm.weight"}},
                                                   {{"norm.bias"}, {"norm.bias"}},
                                               }));
}

TEST(LoRAMethod, MergeRestoresTypesKeysAndForward) {
  Block block;
  const auto original_keys = keys_of(*block);
  auto q_impl = block->q.ptr();
  peft::LoRA lora({"q|k", peft::LoRAParameters().r(2).alpha(4)});
  peft::inject_peft_and_freeze(lora, block);
  auto q_wrapper = block->named_children()["q"]->as<peft::LoRALinearImpl>();
  fill_adapters(*q_wrapper, 0.3f, -0.2f);
  auto x = torch::randn({3, 4});
  auto adapted = block->forward(x);

  peft::merge_peft(lora, block);
  EXPECT_EQ(keys_of(*block), original_keys);
  EXPECT_EQ(block->named_children()["q"].get(), q_impl.get());
  EXPECT_NE(block->named_children()["k"]->as<d9d::nn::LinearImpl>(), nullptr);
  EXPECT_FALSE(q_impl->has_override());
  EXPECT_TRUE(torch::allclose(block->forward(x), adapted, 1e-5, 1e-6));
}

TEST(LoRAMethod, AdaptsPlainLinearInsideSequential) {
  torch::nn::Sequential seq(torch::nn::Linear(4, 8), torch::nn::ReLU(), torch::nn::Linear(8, 3));
  auto first = seq->ptr<torch::nn::LinearImpl>(0);
  peft::LoRA lora({"0|2", peft::LoRAParameters().r(2).alpha(2)});
  auto mapper = peft::inject_peft_and_freeze(lora, *seq);
  auto wrapper = seq->ptr<peft::LoRALinearImpl>(0);
  ASSERT_NE(wrapper, nullptr) << "the Sequential's call list must hold the wrapper";
  EXPECT_EQ(seq->named_children()["0"].get(), wrapper.get());
  fill_adapters(*wrapper, 0.1f, 0.2f);
  auto x = torch::randn({2, 4});
  auto h = first->forward(x) + 1.0 * x.matmul(wrapper->lora_A->weight.t()).matmul(wrapper->lora_B->weight.t());
  auto expected = seq->ptr<peft::LoRALinearImpl>(2)->forward(torch::relu(h));
  auto got = seq->forward(x);
  EXPECT_TRUE(torch::allclose(got, expected, 1e-5, 1e-6));

  peft::merge_peft(lora, *seq);
  EXPECT_EQ(seq->ptr<torch::nn::LinearImpl>(0).get(), first.get());
  EXPECT_NE(seq->ptr<torch::nn::LinearImpl>(2), nullptr);
  EXPECT_TRUE(torch::allclose(seq->forward(x), got, 1e-5, 1e-6));
}

TEST(LoRAMethod, AdaptsPlainLinearInsideModuleListAndModuleDict) {
  struct HolderImpl : torch::nn::Module {
    HolderImpl() {
      list = register_module("list", torch::nn::ModuleList(torch::nn::Linear(4, 4), torch::nn::Linear(4, 4)));
      dict = register_module(
          "dict", torch::nn::ModuleDict(std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>{
                      {"proj", torch::nn::Linear(4, 2).ptr()}}));
    }
    torch::nn::ModuleList list{nullptr};
    torch::nn::ModuleDict dict{nullptr};
  };
  auto holder = std::make_shared<HolderImpl>();
  peft::LoRA lora({"list\\.1|dict\\.proj", peft::LoRAParameters().r(2).alpha(2)});
  peft::inject_peft_and_freeze(lora, *holder);
  EXPECT_NE(holder->list->ptr<torch::nn::LinearImpl>(0), nullptr);
  EXPECT_NE(holder->list->ptr<peft::LoRALinearImpl>(1), nullptr) << "the list's own vector must hold the wrapper";
  EXPECT_NE(holder->dict["proj"]->as<peft::LoRALinearImpl>(), nullptr);
  EXPECT_EQ(holder->named_parameters().size(), 2u + 4u + 4u);  // plain list.0; wrappers hold base w+b, A, B
  peft::merge_peft(lora, *holder);
  EXPECT_NE(holder->list->ptr<torch::nn::LinearImpl>(1), nullptr);
  EXPECT_NE(holder->dict["proj"]->as<torch::nn::LinearImpl>(), nullptr);
}

TEST(LoRAMethod, D9dLinearInsideSequentialIsRoutedToo) {
  torch::nn::Sequential seq(d9d::nn::Linear(4, 4));
  peft::LoRA lora({"0", peft::LoRAParameters().r(2).alpha(2)});
  peft::inject_peft_and_freeze(lora, *seq);
  auto wrapper = seq->named_children()["0"]->as<peft::LoRALinearImpl>();
  ASSERT_NE(wrapper, nullptr);
  fill_adapters(*wrapper, 1.0f, 1.0f);
  auto x = torch::ones({1, 4});
  EXPECT_TRUE(torch::allclose(seq->forward(x), wrapper->d9d_base->forward_base(x) + 8.0));
}

// ------------------------------------------------------- method: errors

TEST(LoRAMethod, PlainLinearHeldByATypedMemberIsAnError) {
  Plain plain;
  peft::LoRA lora({"fc", peft::LoRAParameters().r(2).alpha(4)});
  try {
    peft::inject_peft_and_freeze(lora, plain);
    FAIL() << "expected PeftError";
  } catch (const peft::PeftError& e) {
    EXPECT_THAT(e.what(), HasSubstr("cannot adapt 'fc' (torch::nn::LinearImpl)"));
    EXPECT_THAT(e.what(), HasSubstr("Declare the layer as d9d::nn::Linear"));
  }
  EXPECT_NE(plain->named_children()["fc"]->as<torch::nn::LinearImpl>(), nullptr);
  EXPECT_TRUE(plain->fc->weight.requires_grad()) << "a failed injection must not freeze";
}

TEST(LoRAMethod, PatternMatchingNothingIsAnError) {
  Block block;
  peft::LoRA lora({".*attention.*", peft::LoRAParameters().r(2).alpha(4)});
  EXPECT_THAT([&] { peft::inject_peft_and_freeze(lora, block); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr(
                  "module_name_pattern \".*attention.*\" matches no module; it must match the whole qualified "
                  "name, and adaptable layers here are named like 'q', 'k'")));
}

TEST(LoRAMethod, MatchingAnUnsupportedLeafIsAnError) {
  Block block;
  peft::LoRA lora({"q|norm", peft::LoRAParameters().r(2).alpha(4)});
  EXPECT_THAT([&] { peft::inject_peft_and_freeze(lora, block); },
              ::testing::ThrowsMessage<peft::PeftError>(
                  HasSubstr("matches 'norm' of type torch::nn::LayerNormImpl, which LoRA cannot adapt")));
  EXPECT_NE(block->named_children()["q"]->as<d9d::nn::LinearImpl>(), nullptr) << "nothing may be wrapped";
  EXPECT_FALSE(block->q->has_override());
}

TEST(LoRAMethod, MatchingOnlyContainersIsAnError) {
  torch::nn::Sequential inner(d9d::nn::Linear(2, 2));
  torch::nn::ModuleList outer;
  outer->push_back(inner);
  peft::LoRA lora({"0", peft::LoRAParameters().r(1).alpha(1)});
  EXPECT_THAT([&] { peft::inject_peft_and_freeze(lora, *outer); },
              ::testing::ThrowsMessage<peft::PeftError>(
                  ::testing::AllOf(HasSubstr("matches '0' but none is a layer LoRA can adapt (it adapts "),
                                   HasSubstr("adaptable layers here are named like '0.0'"))));
}

TEST(LoRAMethod, NeverWrapsTheInsideOfAnAdapter) {
  Block block;
  peft::LoRA first({"q", peft::LoRAParameters().r(2).alpha(4)});
  peft::inject_peft_and_freeze(first, block);
  // "q.*" would match 'q.base' and 'q.lora_A' inside the wrapper; only the
  // wrapper 'q' itself is a candidate, and it already holds "default".
  peft::LoRA second({"q.*", peft::LoRAParameters().r(2).alpha(4)});
  const auto keys = block->named_parameters().keys();
  EXPECT_THAT([&] { second.inject(*block); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("'q' already holds an adapter \"default\"")));
  EXPECT_EQ(block->named_parameters().keys(), keys);
}

TEST(LoRAMethod, DroppedWrapperIsReportedOnTheNextCall) {
  Block block;
  peft::LoRA lora({"q", peft::LoRAParameters().r(2).alpha(4)});
  peft::inject_peft_and_freeze(lora, block);
  block->replace_module("q", d9d::nn::Linear(4, 4).ptr());
  EXPECT_THAT([&] { block->q(torch::ones({1, 4})); },
              ::testing::ThrowsMessage<peft::PeftError>(
                  HasSubstr("was removed from the module tree without merge_peft")));
}

TEST(LoRAMethod, CloningAnInjectedModelIsAnError) {
  torch::nn::Sequential seq(d9d::nn::Linear(2, 2));
  peft::LoRA lora({"0", peft::LoRAParameters().r(1).alpha(1)});
  peft::inject_peft_and_freeze(lora, *seq);
  EXPECT_THROW(seq->clone(), c10::Error);
  peft::merge_peft(lora, *seq);
  EXPECT_NO_THROW(seq->clone());
}
