// d9d::nn::GroupedLinear (the experts of a mixture-of-experts block) and LoRA on it.
#include <d9d/nn/grouped_linear.h>
#include <d9d/peft.h>
#include <d9d/peft/lora/grouped_linear.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "test_util.h"
#include "toy_moe.h"

#include <functional>
#include <random>

using ::testing::AllOf;
using ::testing::HasSubstr;
namespace peft = d9d::peft;
namespace ms = d9d::model_state;

namespace {

/// `x[slice of group g] @ W[g]`, group after group.
at::Tensor per_expert(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& sizes) {
  std::vector<at::Tensor> outs;
  int64_t begin = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    outs.push_back(x.narrow(0, begin, sizes[g]).matmul(w[static_cast<int64_t>(g)]));
    begin += sizes[g];
  }
  return at::cat(outs);
}

at::Tensor sizes_tensor(const std::vector<int64_t>& sizes) { return torch::tensor(sizes, torch::kLong); }

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return a.numel() == 0 ? 0.0 : (a - b).abs().max().item<double>();
}

/// Random token counts for `groups` groups summing to `tokens`, some empty.
std::vector<int64_t> random_sizes(std::mt19937& rng, int64_t groups, int64_t tokens) {
  std::vector<int64_t> sizes(static_cast<size_t>(groups), 0);
  std::uniform_int_distribution<int64_t> pick(0, groups / 2);  // half the groups stay empty
  for (int64_t t = 0; t < tokens; ++t) ++sizes[static_cast<size_t>(pick(rng))];
  return sizes;
}

/// One grouped layer held by a typed member, for mixed batches (rows = routed tokens).
struct ExpertHolderImpl : torch::nn::Module {
  ExpertHolderImpl(int64_t groups, int64_t in, int64_t out)
      : experts(register_module("experts", d9d::nn::GroupedLinear(groups, in, out))) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& sizes) { return experts(x, sizes); }
  d9d::nn::GroupedLinear experts;
};
TORCH_MODULE(ExpertHolder);

const std::string kExperts = ".*experts\\.(gate|up|down)_proj";

peft::LoRAGroupedLinearImpl& lora_at(torch::nn::Module& model, const std::string& name) {
  auto* layer = model.named_modules()[name]->as<peft::LoRAGroupedLinearImpl>();
  if (!layer) throw std::runtime_error(name + " is no LoRAGroupedLinear");
  return *layer;
}

void randomise(peft::LoRAGroupedLinearAdapterImpl& a) {
  torch::NoGradGuard g;
  a.lora_A->weight.normal_(0, 0.3);
  a.lora_B->weight.normal_(0, 0.3);
}

/// Every grouped LoRA layer's adapter `name` gets random weights.
void randomise_all(torch::nn::Module& model, const std::string& name = peft::kDefaultAdapterName) {
  for (const auto& entry : peft::adapter_layers(model)) {
    if (auto* layer = entry.module->as<peft::LoRAGroupedLinearImpl>()) randomise(layer->adapter(name));
  }
}

at::Tensor run(toy::ToyMoE& model, const at::Tensor& x) {
  torch::NoGradGuard g;
  return model->forward(x);
}

}  // namespace

// ------------------------------------------------------- d9d::nn::GroupedLinear

TEST(GroupedLinear, WeightLayoutAndInitAreD9ds) {
  torch::manual_seed(0);
  d9d::nn::GroupedLinear layer(d9d::nn::GroupedLinearOptions(3, 16, 5));
  const auto keys = layer->named_parameters().keys();
  EXPECT_EQ(keys, std::vector<std::string>{"weight"});
  EXPECT_EQ(layer->weight.sizes(), (std::vector<int64_t>{3, 16, 5}));
  EXPECT_LE(layer->weight.abs().max().item<double>(), 0.25);  // 1/sqrt(16)
  EXPECT_GT(layer->weight.abs().max().item<double>(), 0.2);
  std::ostringstream s;
  s << *layer;
  EXPECT_EQ(s.str(), "d9d::nn::GroupedLinear(groups=3, in_features=16, out_features=5)");
  EXPECT_THAT([] { d9d::nn::GroupedLinear(2, -1, 3); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("GroupedLinearOptions.in_features: must be >= 0")));
  auto copy = std::dynamic_pointer_cast<d9d::nn::GroupedLinearImpl>(layer->clone());
  EXPECT_TRUE(torch::equal(copy->weight, layer->weight));
}

TEST(GroupedLinear, ForwardEqualsAPerExpertLoop) {
  torch::manual_seed(1);
  std::mt19937 rng(1);
  for (const int64_t groups : {1, 3, 8, 64}) {
    d9d::nn::GroupedLinear layer(groups, 12, 7);
    std::vector<std::vector<int64_t>> cases = {random_sizes(rng, groups, 50), random_sizes(rng, groups, 1),
                                               std::vector<int64_t>(static_cast<size_t>(groups), 0)};
    std::vector<int64_t> all_in_last(static_cast<size_t>(groups), 0);
    all_in_last.back() = 33;
    cases.push_back(all_in_last);
    for (const auto& sizes : cases) {
      int64_t tokens = 0;
      for (const int64_t n : sizes) tokens += n;
      const auto x = torch::randn({tokens, 12});
      const auto expected = per_expert(x, layer->weight.detach(), sizes);
      {
        torch::NoGradGuard g;
        const auto y = layer(x, sizes_tensor(sizes));
        ASSERT_EQ(y.sizes(), (std::vector<int64_t>{tokens, 7}));
        EXPECT_LE(max_diff(y, expected), 1e-5) << "groups " << groups;
      }
      const auto y = layer(x, sizes_tensor(sizes));  // the autograd path
      EXPECT_LE(max_diff(y, expected), 1e-5) << "groups " << groups;
    }
  }
}

TEST(GroupedLinear, GradientsEqualThePerExpertLoops) {
  torch::manual_seed(2);
  d9d::nn::GroupedLinear layer(4, 6, 5);
  const std::vector<int64_t> sizes = {3, 0, 5, 2};
  const auto x = torch::randn({10, 6}).requires_grad_(true);
  const auto upstream = torch::randn({10, 5});
  (layer(x, sizes_tensor(sizes)) * upstream).sum().backward();
  const auto x_ref = x.detach().clone().requires_grad_(true);
  const auto w_ref = layer->weight.detach().clone().requires_grad_(true);
  (per_expert(x_ref, w_ref, sizes) * upstream).sum().backward();
  EXPECT_LE(max_diff(x.grad(), x_ref.grad()), 1e-5);
  EXPECT_LE(max_diff(layer->weight.grad(), w_ref.grad()), 1e-5);
  EXPECT_EQ(layer->weight.grad()[1].abs().sum().item<double>(), 0.0) << "an empty expert gets no gradient";
}

TEST(GroupedLinear, GroupedMmPathMatchesTheLoop) {
  // LibTorch 2.9+ runs at::_grouped_mm on CUDA; its CPU kernel checks the call here.
  if (!d9d::nn::detail::use_grouped_mm_on_cpu(true)) GTEST_SKIP() << "this LibTorch has no at::_grouped_mm";
  struct Off {
    ~Off() { d9d::nn::detail::use_grouped_mm_on_cpu(false); }
  } off;
  torch::manual_seed(11);
  d9d::nn::GroupedLinear layer(3, 16, 8);
  layer->to(torch::kBFloat16);
  const auto w = layer->weight.detach().to(torch::kFloat);
  for (const std::vector<int64_t>& sizes : {std::vector<int64_t>{8, 0, 16}, std::vector<int64_t>{3, 0, 5}}) {
    int64_t tokens = 0;
    for (const int64_t n : sizes) tokens += n;
    const auto x = torch::randn({tokens, 16}).to(torch::kBFloat16).requires_grad_(true);
    const auto expected = per_expert(x.detach().to(torch::kFloat), w, sizes);
    {
      torch::NoGradGuard g;
      EXPECT_LE(max_diff(layer(x, sizes_tensor(sizes)).to(torch::kFloat), expected), 0.05);
    }
    layer->weight.mutable_grad() = at::Tensor();
    const auto y = layer(x, sizes_tensor(sizes));
    const bool grouped = sizes[0] % 8 == 0;  // the weight's gradient needs 16-byte aligned groups
    EXPECT_EQ(y.grad_fn()->name().find("ContiguousGrad") != std::string::npos, grouped) << y.grad_fn()->name();
    y.sum().backward();  // an expanded gradient, which _grouped_mm's backward alone refuses
    const auto x_ref = x.detach().to(torch::kFloat).requires_grad_(true);
    const auto w_ref = w.clone().requires_grad_(true);
    per_expert(x_ref, w_ref, sizes).sum().backward();
    EXPECT_LE(max_diff(x.grad().to(torch::kFloat), x_ref.grad()), 0.1);
    EXPECT_LE(max_diff(layer->weight.grad().to(torch::kFloat), w_ref.grad()), 0.1);
  }
}

TEST(GroupedLinear, BadInputsNameTheLayerAndTheShapes) {
  d9d::nn::GroupedLinear layer(3, 4, 2);
  const auto x = torch::randn({5, 4});
  auto message = [&](const at::Tensor& in, const at::Tensor& sizes) -> std::string {
    try {
      layer(in, sizes);
    } catch (const peft::PeftError& e) {
      return e.what();
    }
    return "no error";
  };
  const auto layer_name = HasSubstr("d9d::nn::GroupedLinear(groups=3, in_features=4, out_features=2)");
  EXPECT_THAT(message(x, sizes_tensor({2, 3})),
              AllOf(layer_name, HasSubstr("group_sizes has shape [2], expected [3]: one token count per group")));
  EXPECT_THAT(message(x, sizes_tensor({2, 2, 2})),
              AllOf(layer_name, HasSubstr("group_sizes sum to 6 but the input has 5 tokens (input [5, 4])")));
  EXPECT_THAT(message(x, sizes_tensor({4, -1, 2})), HasSubstr("group_sizes[1] is -1; token counts must be >= 0"));
  EXPECT_THAT(message(x, torch::tensor({2, 2, 1}, torch::kInt)),
              HasSubstr("group_sizes must be int64 (torch::kLong), got Int"));
  EXPECT_THAT(message(x, torch::tensor({2.0, 2.0, 1.0})), HasSubstr("group_sizes must be int64"));
  EXPECT_THAT(message(torch::randn({5, 3}), sizes_tensor({2, 2, 1})),
              AllOf(layer_name, HasSubstr("input must be [tokens, in_features=4], got [5, 3]")));
  EXPECT_THAT(message(torch::randn({1, 5, 4}), sizes_tensor({2, 2, 1})),
              HasSubstr("input must be [tokens, in_features=4], got [1, 5, 4]; flatten the tokens to rows"));
  EXPECT_THAT(message(x.to(torch::kDouble), sizes_tensor({2, 2, 1})),
              HasSubstr("input is Double on cpu but the weight is Float on cpu"));
  EXPECT_THAT(message(x, sizes_tensor({2, 2, 1})), "no error");
}

TEST(GroupedLinear, IsADropInForTheExpertsOfAMoEBlock) {
  torch::manual_seed(3);
  toy::MoEConfig c;
  toy::ToyMoE model(c);
  model->eval();
  const auto x = torch::randn({9, c.d});
  const auto y = run(model, x);

  // The same block token by token, each token through its k experts directly.
  torch::NoGradGuard g;
  at::Tensor h = x;
  for (const auto& layer_module : *model->layers) {
    auto& layer = *layer_module->as<toy::MoELayerImpl>();
    const auto& experts = *layer.moe->experts;
    const auto normed = layer.norm(h);
    const auto probs = torch::softmax(normed.matmul(layer.moe->router->weight.t()), -1);
    auto [weights, chosen] = probs.topk(c.top_k, -1);
    weights = weights / weights.sum(-1, true);
    std::vector<at::Tensor> rows;
    for (int64_t t = 0; t < x.size(0); ++t) {
      at::Tensor out = torch::zeros({c.d});
      for (int64_t k = 0; k < c.top_k; ++k) {
        const int64_t e = chosen[t][k].item<int64_t>();
        const auto v = normed[t];
        const auto inner = torch::silu(v.matmul(experts.gate_proj->weight[e])) * v.matmul(experts.up_proj->weight[e]);
        out = out + weights[t][k] * inner.matmul(experts.down_proj->weight[e]);
      }
      rows.push_back(out);
    }
    h = h + torch::stack(rows);
  }
  EXPECT_LE(max_diff(y, h), 1e-5);
}

// ------------------------------------------------------- LoRA on GroupedLinear

TEST(GroupedLoRA, InjectedByPatternWithD9dsKeysAndAStandardCheckpointLoads) {
  torch::manual_seed(4);
  toy::MoEConfig c;
  toy::ToyMoE original(c);
  original->eval();
  const auto checkpoint = ms::module_state_dict(*original);

  torch::manual_seed(99);  // other weights: the checkpoint must replace them
  toy::ToyMoE model(c);
  model->eval();
  peft::LoRA lora({kExperts, peft::LoRAParameters().r(4).alpha(8)});
  auto mapper = peft::inject_peft_and_freeze(lora, model);

  const auto params = model->named_parameters();
  const std::string p = "layers.0.moe.experts.";
  EXPECT_EQ(params[p + "gate_proj.base.weight"].sizes(), (std::vector<int64_t>{4, 16, 24}));
  EXPECT_EQ(params[p + "gate_proj.lora_A.weight"].sizes(), (std::vector<int64_t>{4, 16, 4}));
  EXPECT_EQ(params[p + "gate_proj.lora_B.weight"].sizes(), (std::vector<int64_t>{4, 4, 24}));
  EXPECT_EQ(params[p + "down_proj.lora_A.weight"].sizes(), (std::vector<int64_t>{4, 24, 4}));
  EXPECT_EQ(params[p + "down_proj.lora_B.weight"].sizes(), (std::vector<int64_t>{4, 4, 16}));
  EXPECT_FALSE(params.contains(p + "gate_proj.weight"));
  EXPECT_TRUE(params.contains("layers.1.moe.router.weight")) << "the router is no expert";
  EXPECT_EQ(peft::adapter_layers(*model).size(), 6u);
  EXPECT_EQ(lora_at(*model, p + "up_proj").scale(), 2.0);

  ms::load_state_dict(*model, checkpoint, *mapper, d9d_test::quiet());
  const auto x = torch::randn({11, c.d});
  EXPECT_LE(max_diff(run(model, x), run(original, x)), 1e-6) << "B starts at zero: the original's output";
}

TEST(GroupedLoRA, ForwardAddsEachExpertsLowRankTerm) {
  torch::manual_seed(5);
  auto base = std::make_shared<d9d::nn::GroupedLinearImpl>(3, 8, 6);
  peft::LoRAGroupedLinear lora(base, peft::LoRAParameters().r(2).alpha(6).use_rslora(true));
  randomise(lora->adapter(peft::kDefaultAdapterName));
  EXPECT_DOUBLE_EQ(lora->scale(), 6.0 / std::sqrt(2.0));
  const std::vector<int64_t> sizes = {4, 0, 3};
  const auto x = torch::randn({7, 8});
  const auto expected =
      per_expert(x, base->weight, sizes) +
      lora->scale() * per_expert(per_expert(x, lora->lora_A->weight, sizes), lora->lora_B->weight, sizes);
  EXPECT_LE(max_diff(lora(x, sizes_tensor(sizes)), expected), 1e-5);
  base->set_override(lora.ptr());  // what injection does
  EXPECT_LE(max_diff(base->forward(x, sizes_tensor(sizes)), expected), 1e-5) << "calls to the base reach the wrapper";
  EXPECT_LE(max_diff(base->forward_base(x, sizes_tensor(sizes)), per_expert(x, base->weight, sizes)), 1e-6);
  EXPECT_THAT([&] { static_cast<d9d::nn::LayerOverride&>(*lora).forward(x); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("a grouped expert layer needs its group sizes")));
  EXPECT_THAT([&] { lora(x, sizes_tensor({4, 3})); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("group_sizes has shape [2], expected [3]")));
}

TEST(GroupedLoRA, MergedEqualsUnmergedAndUnmergeRestoresTheWeights) {
  torch::manual_seed(6);
  toy::ToyMoE model;
  model->eval();
  peft::LoRA lora({kExperts, peft::LoRAParameters().r(3).alpha(5)});
  peft::inject_peft_and_freeze(lora, model);
  randomise_all(*model);
  const auto x = torch::randn({10, 16});
  const auto unmerged = run(model, x);
  const auto w = lora_at(*model, "layers.1.moe.experts.down_proj").base->weight.detach().clone();

  peft::merge_adapters_in_place(*model);
  auto& down = lora_at(*model, "layers.1.moe.experts.down_proj");
  EXPECT_EQ(down.merged_adapters(), std::vector<std::string>{"default"});
  const auto delta = down.delta_weight("default");
  EXPECT_LE(max_diff(down.base->weight, w + delta), 1e-6);
  EXPECT_LE(max_diff(delta, down.scale() * at::bmm(down.lora_A->weight, down.lora_B->weight)), 1e-6);
  EXPECT_LE(max_diff(run(model, x), unmerged), 1e-5);
  peft::unmerge_adapters(*model);
  EXPECT_LE(max_diff(down.base->weight, w), 1e-6);
  EXPECT_LE(max_diff(run(model, x), unmerged), 1e-5);

  peft::merge_peft(lora, model);
  EXPECT_TRUE(peft::adapter_layers(*model).empty());
  auto* plain = model->named_modules()["layers.1.moe.experts.down_proj"]->as<d9d::nn::GroupedLinearImpl>();
  ASSERT_NE(plain, nullptr);
  EXPECT_FALSE(plain->has_override());
  EXPECT_TRUE(model->named_parameters().contains("layers.1.moe.experts.down_proj.weight"));
  EXPECT_LE(max_diff(run(model, x), unmerged), 1e-5);
}

TEST(GroupedLoRA, GradientsReachOnlyTheAdapters) {
  torch::manual_seed(7);
  toy::ToyMoE model;
  peft::LoRA lora({kExperts, peft::LoRAParameters().r(2).alpha(4)});
  peft::inject_peft_and_freeze(lora, model);
  EXPECT_EQ(peft::trainable_parameters(*model).size(), 12u);  // 2 layers x 3 experts x (A, B)
  model->forward(torch::randn({8, 16})).pow(2).sum().backward();
  for (const auto& p : model->named_parameters()) {
    const bool adapter = p.key().find(".lora_") != std::string::npos;
    EXPECT_EQ(p.value().grad().defined(), adapter) << p.key();
  }
  const auto& up = lora_at(*model, "layers.0.moe.experts.up_proj");
  EXPECT_GT(up.lora_B->weight.grad().abs().sum().item<double>(), 0.0);
}

TEST(GroupedLoRA, TwoAdaptersSwitchAndDelete) {
  torch::manual_seed(8);
  toy::ToyMoE model;
  model->eval();
  peft::LoRA lora({kExperts, peft::LoRAParameters().r(2).alpha(4)});
  peft::inject_peft_and_freeze(lora, model);
  randomise_all(*model);
  const auto x = torch::randn({6, 16});
  const auto with_default = run(model, x);

  peft::LoRATargeting second;
  second.adapter_name = "b";
  second.what = "experts";
  second.select = [](const std::string& name) -> std::optional<peft::LoRAParameters> {
    if (name.find("experts.") == std::string::npos) return std::nullopt;
    return peft::LoRAParameters().r(3).alpha(3);
  };
  peft::inject_lora(*model, second);
  randomise_all(*model, "b");
  EXPECT_TRUE(model->named_parameters().contains("layers.0.moe.experts.gate_proj.adapters.b.lora_A.weight"));
  EXPECT_EQ(model->named_parameters()["layers.0.moe.experts.gate_proj.adapters.b.lora_B.weight"].sizes(),
            (std::vector<int64_t>{4, 3, 24}));
  EXPECT_LE(max_diff(run(model, x), with_default), 1e-6) << "the second adapter starts inactive";

  peft::set_adapter(*model, "b");
  const auto with_b = run(model, x);
  EXPECT_GT(max_diff(with_b, with_default), 1e-3);
  // The reference for b: b's weights as the only adapter.
  peft::delete_adapter(*model, "default");
  EXPECT_TRUE(model->named_parameters().contains("layers.0.moe.experts.gate_proj.lora_A.weight"))
      << "b moved to the top";
  EXPECT_LE(max_diff(run(model, x), with_b), 1e-6);
  peft::DisableAdapters off(*model);
  EXPECT_GT(max_diff(run(model, x), with_b), 1e-3);
}

TEST(GroupedLoRA, AdaptersInAnotherDtypeComputeInTheirOwn) {
  torch::manual_seed(12);
  toy::ToyMoE model;
  model->eval();
  peft::LoRA lora({kExperts, peft::LoRAParameters().r(2).alpha(4)});
  peft::inject_peft_and_freeze(lora, model);
  randomise_all(*model);
  const auto x = torch::randn({7, 16});
  const auto before = run(model, x);
  peft::cast_adapter_dtype(*model, "default", torch::kDouble);
  EXPECT_EQ(lora_at(*model, "layers.0.moe.experts.up_proj").lora_A->weight.scalar_type(), torch::kDouble);
  const auto after = run(model, x);
  EXPECT_EQ(after.scalar_type(), torch::kFloat);
  EXPECT_LE(max_diff(after, before), 1e-5);
}

TEST(GroupedLoRA, MixedBatchEqualsPerAdapterRuns) {
  torch::manual_seed(9);
  ExpertHolder model(4, 8, 5);
  model->eval();
  peft::LoRA lora({"experts", peft::LoRAParameters().r(2).alpha(4)});
  peft::inject_peft_and_freeze(lora, model);
  peft::LoRATargeting second;
  second.adapter_name = "b";
  second.what = "experts";
  second.select = [](const std::string& name) -> std::optional<peft::LoRAParameters> {
    if (name != "experts") return std::nullopt;
    return peft::LoRAParameters().r(3).alpha(2).use_rslora(true);
  };
  peft::inject_lora(*model, second);
  randomise_all(*model);
  randomise_all(*model, "b");

  const std::vector<int64_t> sizes = {3, 0, 4, 2};
  const auto x = torch::randn({9, 8});
  const std::vector<std::string> rows = {"b", "default", "__base__", "b", "b", "default", "__base__", "default", "b"};
  auto all_rows = [&](const std::string& adapter) {
    torch::NoGradGuard g;
    if (adapter == "__base__") {
      peft::DisableAdapters off(*model);
      return model->forward(x, sizes_tensor(sizes));
    }
    peft::set_adapter(*model, adapter);
    return model->forward(x, sizes_tensor(sizes));
  };
  const auto a_out = all_rows("default"), b_out = all_rows("b"), base_out = all_rows("__base__");
  at::Tensor mixed;
  {
    peft::MixedBatchScope scope(*model, rows);
    torch::NoGradGuard g;
    mixed = model->forward(x, sizes_tensor(sizes));
  }
  for (size_t r = 0; r < rows.size(); ++r) {
    const auto& expected = rows[r] == "b" ? b_out : rows[r] == "default" ? a_out : base_out;
    EXPECT_LE(max_diff(mixed[static_cast<int64_t>(r)], expected[static_cast<int64_t>(r)]), 1e-5) << "row " << r;
  }
  peft::MixedBatchScope scope(*model, {"b", "default"});
  EXPECT_THAT([&] { model->forward(x, sizes_tensor(sizes)); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("names an adapter for 2 rows")));
}

TEST(GroupedLoRA, DropoutActsInTrainingOnly) {
  torch::manual_seed(10);
  auto base = std::make_shared<d9d::nn::GroupedLinearImpl>(2, 32, 8);
  peft::LoRAGroupedLinear lora(base, peft::LoRAParameters().r(4).alpha(4).dropout(0.5));
  randomise(lora->adapter(peft::kDefaultAdapterName));
  const std::vector<int64_t> sizes = {10, 6};
  const auto x = torch::randn({16, 32});
  const auto plain = per_expert(x, base->weight, sizes) +
                     per_expert(per_expert(x, lora->lora_A->weight, sizes), lora->lora_B->weight, sizes);
  torch::NoGradGuard g;
  lora->train();
  const auto first = lora(x, sizes_tensor(sizes)), second = lora(x, sizes_tensor(sizes));
  EXPECT_GT(max_diff(first, plain), 1e-3);
  EXPECT_GT(max_diff(first, second), 1e-3);
  lora->eval();
  EXPECT_LE(max_diff(lora(x, sizes_tensor(sizes)), plain), 1e-5);
}

TEST(GroupedLoRA, DoRAIsRefusedNamingTheLayer) {
  toy::ToyMoE model;
  const auto keys = model->named_parameters().keys();
  peft::LoRA lora({kExperts, peft::LoRAParameters().use_dora(true)});
  EXPECT_THAT([&] { peft::inject_peft_and_freeze(lora, model); },
              ::testing::ThrowsMessage<peft::PeftError>(
                  AllOf(HasSubstr("DoRA (use_dora) is not supported on grouped expert layers"),
                        HasSubstr("'layers.0.moe.experts.gate_proj' is a d9d::nn::GroupedLinear"))));
  EXPECT_EQ(model->named_parameters().keys(), keys) << "nothing was injected";
  auto base = std::make_shared<d9d::nn::GroupedLinearImpl>(2, 4, 4);
  EXPECT_THAT([&] { (void)peft::LoRAGroupedLinear(base, peft::LoRAParameters().use_dora(true)); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("not supported on grouped expert layers")));
}

TEST(GroupedLoRA, SavingInHuggingFaceFormatIsAClearError) {
  toy::ToyMoE model;
  peft::LoRA lora({kExperts, peft::LoRAParameters().r(2)});
  peft::inject_peft_and_freeze(lora, model);
  d9d_test::TempDir dir;
  EXPECT_THAT([&] { peft::hf::save_adapter(*model, dir / "adapter"); },
              ::testing::ThrowsMessage<peft::PeftError>(
                  HasSubstr("'layers.0.moe.experts.gate_proj' is a LoRA layer on grouped experts")));
  EXPECT_FALSE(std::filesystem::exists(dir / "adapter")) << "nothing was written";
}
