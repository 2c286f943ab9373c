// LoRA on d9d::nn::GroupedLinear (the experts of a mixture-of-experts block).
#include <d9d/peft.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "grouped_test_util.h"
#include "test_util.h"
#include "toy_moe.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

using ::testing::AllOf;
using ::testing::HasSubstr;
using namespace grouped_test;
namespace peft = d9d::peft;
namespace ms = d9d::model_state;

namespace {

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

}  // namespace

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

TEST(GroupedLoRA, GradientsEqualThoseOfThePerExpertFormula) {
  // The single-adapter CPU path is one autograd node with its own backward;
  // its gradients must be those autograd derives through the plain formula.
  torch::manual_seed(8);
  const std::vector<int64_t> sizes = {4, 0, 3, 5};
  for (const bool base_trains : {false, true}) {
    for (const bool expanded_grad : {false, true}) {
      auto base = std::make_shared<d9d::nn::GroupedLinearImpl>(4, 6, 5);
      peft::LoRAGroupedLinear lora(base, peft::LoRAParameters().r(3).alpha(7));
      lora->to(torch::kDouble);
      randomise(lora->adapter(peft::kDefaultAdapterName));
      base->weight.requires_grad_(base_trains);
      const auto x = torch::randn({12, 6}, torch::kDouble).requires_grad_(true);
      const auto g = torch::randn({12, 5}, torch::kDouble);
      const auto y = lora(x, sizes_tensor(sizes));
      (expanded_grad ? y.sum() : (y * g).sum()).backward();

      const auto w = base->weight.detach().clone().requires_grad_(true);
      const auto a = lora->lora_A->weight.detach().clone().requires_grad_(true);
      const auto b = lora->lora_B->weight.detach().clone().requires_grad_(true);
      const auto xr = x.detach().clone().requires_grad_(true);
      const auto ref = per_expert(xr, w, sizes) + lora->scale() * per_expert(per_expert(xr, a, sizes), b, sizes);
      EXPECT_LE(max_diff(y, ref), 1e-12);
      (expanded_grad ? ref.sum() : (ref * g).sum()).backward();
      const std::string what = std::string(base_trains ? "base trained" : "base frozen") +
                               (expanded_grad ? ", y.sum()" : ", (y * g).sum()");
      EXPECT_LE(max_diff(x.grad(), xr.grad()), 1e-12) << what;
      EXPECT_LE(max_diff(lora->lora_A->weight.grad(), a.grad()), 1e-12) << what;
      EXPECT_LE(max_diff(lora->lora_B->weight.grad(), b.grad()), 1e-12) << what;
      EXPECT_EQ(lora->lora_A->weight.grad()[1].abs().sum().item<double>(), 0.0) << "the empty group: " << what;
      ASSERT_EQ(base->weight.grad().defined(), base_trains) << what;
      if (base_trains) EXPECT_LE(max_diff(base->weight.grad(), w.grad()), 1e-12) << what;
    }
  }
}

TEST(GroupedLoRA, GradientsWithDropoutEqualFiniteDifferences) {
  // Dropout's mask is drawn from the default generator: reseeding before each
  // forward makes the layer a fixed function, linear in x, in A and in B, so
  // central differences give its directional derivatives exactly (up to rounding).
  torch::manual_seed(9);
  auto base = std::make_shared<d9d::nn::GroupedLinearImpl>(3, 8, 4);
  peft::LoRAGroupedLinear lora(base, peft::LoRAParameters().r(2).alpha(4).dropout(0.5));
  lora->to(torch::kDouble);
  lora->train();
  randomise(lora->adapter(peft::kDefaultAdapterName));
  const std::vector<int64_t> sizes = {5, 2, 3};
  const auto x = torch::randn({10, 8}, torch::kDouble).requires_grad_(true);
  const auto g = torch::randn({10, 4}, torch::kDouble);
  auto loss = [&] {
    torch::manual_seed(123);
    return (lora(x, sizes_tensor(sizes)) * g).sum();
  };
  loss().backward();
  for (const auto& [name, t] : std::vector<std::pair<std::string, at::Tensor>>{
           {"x", x}, {"lora_A", lora->lora_A->weight}, {"lora_B", lora->lora_B->weight}}) {
    const auto v = torch::randn_like(t);
    const double eps = 1e-3;
    double up = 0, down = 0;
    {
      torch::NoGradGuard no_grad;
      t.add_(v, eps);
      up = loss().item<double>();
      t.sub_(v, 2 * eps);
      down = loss().item<double>();
      t.add_(v, eps);
    }
    const double numeric = (up - down) / (2 * eps);
    const double analytic = (t.grad() * v).sum().item<double>();
    EXPECT_NEAR(analytic, numeric, 1e-8 * std::max(1.0, std::abs(numeric))) << name;
  }
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

// ------------------------------------- PEFT's target_parameters adapter files

namespace {

/// A ToyMoE with a random LoRA adapter (r 2, alpha 4) on every expert layer.
toy::ToyMoE adapted_moe(const toy::MoEConfig& c = {}, int64_t r = 2) {
  torch::manual_seed(21);
  toy::ToyMoE model(c);
  model->eval();
  peft::LoRA lora({kExperts, peft::LoRAParameters().r(r).alpha(4)});
  peft::inject_peft_and_freeze(lora, model);
  randomise_all(*model);
  return model;
}

nlohmann::json read_config(const std::string& dir) {
  std::ifstream in(dir + "/adapter_config.json");
  return nlohmann::json::parse(in);
}

void write_config(const std::string& dir, const nlohmann::json& j) { std::ofstream(dir + "/adapter_config.json") << j.dump(2); }

ms::StateDict read_weights(const std::string& dir) { return peft::hf::read_adapter_files(dir).tensors; }

void write_weights(const std::string& dir, const ms::StateDict& t) {
  ms::save_safetensors(dir + "/adapter_model.safetensors", t, {{"format", "pt"}});
}

/// The model's parameter names and values, to see that a failed load left it alone.
std::map<std::string, at::Tensor> snapshot(torch::nn::Module& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : m.named_parameters()) out.emplace(p.key(), p.value().detach().clone());
  return out;
}

bool same(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [k, v] : a) {
    if (!b.count(k) || !torch::equal(v, b.at(k))) return false;
  }
  return true;
}

const std::string kPrefix = "base_model.model.layers.0.moe.experts.";

}  // namespace

TEST(GroupedLoRA, SavedAsPeftTargetParametersWithPeftsKeysAndFactorLayout) {
  toy::MoEConfig c;  // d 16, f 24, 4 experts
  auto model = adapted_moe(c);
  d9d_test::TempDir dir;
  peft::hf::save_adapter(*model, dir / "adapter");
  const auto config = read_config(dir / "adapter");
  EXPECT_TRUE(config.at("target_modules").is_null());
  EXPECT_EQ(config.at("target_parameters"),
            nlohmann::json({"layers.0.moe.experts.gate_proj", "layers.0.moe.experts.up_proj",
                            "layers.0.moe.experts.down_proj", "layers.1.moe.experts.gate_proj",
                            "layers.1.moe.experts.up_proj", "layers.1.moe.experts.down_proj"}));
  EXPECT_EQ(config.at("r"), 2);
  const auto file = read_weights(dir / "adapter");
  EXPECT_EQ(file.size(), 12u);
  // Three targeted parameters of one module: the first registered is innermost.
  const std::map<std::string, std::string> prefix = {{"gate_proj", kPrefix + "base_layer.base_layer."},
                                                     {"up_proj", kPrefix + "base_layer."},
                                                     {"down_proj", kPrefix}};
  for (const auto& [name, key] : prefix) {
    auto& layer = lora_at(*model, "layers.0.moe.experts." + name);
    const auto a_g = layer.lora_A->weight, b_g = layer.lora_B->weight;  // [E, in, r], [E, r, out]
    const int64_t in = a_g.size(1), out = b_g.size(2), r = 2, e_count = c.experts;
    const auto a = file.at(key + "lora_A.weight"), b = file.at(key + "lora_B.weight");
    ASSERT_EQ(a.sizes(), (std::vector<int64_t>{r * e_count, in})) << name;
    ASSERT_EQ(b.sizes(), (std::vector<int64_t>{out, r * e_count})) << name;
    for (int64_t e = 0; e < e_count; ++e) {
      // The spec: A_e = rows e*r..(e+1)*r of lora_A, B_e = columns e::E of lora_B; A_g[e] = A_e.T, B_g[e] = B_e.T.
      EXPECT_TRUE(torch::equal(a.slice(0, e * r, (e + 1) * r), a_g[e].t())) << name << " expert " << e;
      EXPECT_TRUE(torch::equal(b.slice(1, e, b.size(1), e_count), b_g[e].t())) << name << " expert " << e;
    }
  }

  // Loaded back into a fresh model: the same outputs as the adapted model.
  torch::manual_seed(21);
  toy::ToyMoE fresh(c);
  fresh->eval();
  peft::hf::load_adapter(*fresh, dir / "adapter");
  torch::NoGradGuard g;
  const auto x = torch::randn({9, c.d});
  EXPECT_LE(max_diff(fresh->forward(x), model->forward(x)), 1e-6);
}

TEST(GroupedLoRA, UndeclaredInOutStorageSwapsTheFactorsAsPeftDoes) {
  toy::MoEConfig c;
  auto model = adapted_moe(c);
  d9d_test::TempDir dir;
  peft::hf::SaveAdapterOptions options;
  options.experts.storage(peft::hf::ExpertStorage::in_out_undeclared);
  peft::hf::save_adapter(*model, dir / "adapter", options);
  const auto file = read_weights(dir / "adapter");
  auto& layer = lora_at(*model, "layers.0.moe.experts.gate_proj");  // in 16, out 24
  const auto a = file.at(kPrefix + "base_layer.base_layer.lora_A.weight"),
             b = file.at(kPrefix + "base_layer.base_layer.lora_B.weight");
  ASSERT_EQ(a.sizes(), (std::vector<int64_t>{8, 24}));  // PEFT's "in" is the layer's out
  ASSERT_EQ(b.sizes(), (std::vector<int64_t>{16, 8}));
  // PEFT's delta on the stored [E, in, out] parameter: W[e] += s * B_e @ A_e, untransposed.
  const double s = 4.0 / 2;
  for (int64_t e = 0; e < c.experts; ++e) {
    const auto delta = s * b.slice(1, e, 8, c.experts).matmul(a.slice(0, e * 2, e * 2 + 2));
    EXPECT_LE(max_diff(delta, layer.delta_weight(peft::kDefaultAdapterName)[e]), 1e-6) << "expert " << e;
  }
  // Shapes tell the convention on load (the option does not matter for a non-square layer).
  torch::manual_seed(21);
  toy::ToyMoE fresh(c);
  fresh->eval();
  peft::hf::load_adapter(*fresh, dir / "adapter");
  EXPECT_TRUE(torch::equal(lora_at(*fresh, "layers.0.moe.experts.gate_proj").delta_weight("default"),
                           layer.delta_weight("default")));
}

TEST(GroupedLoRA, SquareExpertsAreReadAsTheStorageOptionSays) {
  toy::MoEConfig c;
  c.f = c.d;  // every expert layer square: the file cannot tell the convention
  auto model = adapted_moe(c);
  d9d_test::TempDir dir;
  peft::hf::save_adapter(*model, dir / "adapter");  // out_in
  auto load = [&](peft::hf::ExpertStorage storage) {
    torch::manual_seed(21);
    toy::ToyMoE fresh(c);
    peft::hf::load_adapter(*fresh, dir / "adapter", "default", peft::hf::ExpertOptions().storage(storage));
    return lora_at(*fresh, "layers.1.moe.experts.up_proj").delta_weight("default");
  };
  const auto want = lora_at(*model, "layers.1.moe.experts.up_proj").delta_weight("default");
  EXPECT_TRUE(torch::equal(load(peft::hf::ExpertStorage::out_in), want));
  EXPECT_TRUE(torch::equal(load(peft::hf::ExpertStorage::in_out), want));
  // Read as Llama 4 writes: each expert's delta is the transpose.
  EXPECT_LE(max_diff(load(peft::hf::ExpertStorage::in_out_undeclared), want.transpose(1, 2)), 1e-6);
  EXPECT_GT(max_diff(want, want.transpose(1, 2)), 1e-3);
}

TEST(GroupedLoRA, PeftTargetParameterFilesThatDoNotFitAreRefusedAndTheModelIsUntouched) {
  toy::MoEConfig c;
  auto model = adapted_moe(c);
  d9d_test::TempDir dir;
  peft::hf::save_adapter(*model, dir / "good");
  const auto good_config = read_config(dir / "good");
  const auto good_weights = read_weights(dir / "good");
  int n = 0;
  auto refused = [&](const nlohmann::json& config, const ms::StateDict& weights, const std::vector<std::string>& says,
                     const peft::hf::ExpertOptions& experts = {}) {
    const std::string d = dir / ("bad" + std::to_string(n++));
    std::filesystem::create_directories(d);
    write_config(d, config);
    write_weights(d, weights);
    torch::manual_seed(21);
    toy::ToyMoE fresh(c);
    const auto before = snapshot(*fresh);
    try {
      peft::hf::load_adapter(*fresh, d, "default", experts);
      ADD_FAILURE() << "loaded: " << config.dump();
    } catch (const std::exception& e) {
      for (const auto& s : says) EXPECT_THAT(e.what(), HasSubstr(s));
    }
    EXPECT_TRUE(same(before, snapshot(*fresh))) << "the model was changed";
    EXPECT_TRUE(peft::adapter_names(*fresh).empty());
  };
  const std::string a0 = kPrefix + "lora_A.weight";  // layer 0's down_proj
  {  // a missing factor
    auto w = good_weights;
    w.erase(a0);
    refused(good_config, w, {"lacks", a0, "'layers.0.moe.experts.down_proj'"});
  }
  {  // an extra key
    auto w = good_weights;
    w.emplace("base_model.model.layers.0.moe.router.lora_A.weight", torch::zeros({2, 16}));
    refused(good_config, w, {"no adapter layer", "layers.0.moe.router.lora_A.weight"});
  }
  {  // the wrong rank: the shapes named, expected and got
    auto w = good_weights;
    w[a0] = torch::zeros({12, 24});
    refused(good_config, w, {a0, "[12, 24]", "expected [8, 24] and [16, 8]", "'layers.0.moe.experts.down_proj'"});
  }
  {  // NaN
    auto w = good_weights;
    w[a0] = w[a0].clone();
    w[a0][0][0] = std::nanf("");
    refused(good_config, w, {a0, "NaN"});
  }
  {  // an entry that names no grouped layer
    auto j = good_config;
    j["target_parameters"].push_back("moe.experts.side_proj");
    refused(j, good_weights, {"target_parameters entry \"moe.experts.side_proj\" matches no grouped expert layer",
                              "layers.0.moe.experts.down_proj"});
  }
  for (const auto& [field, value] : std::vector<std::pair<std::string, nlohmann::json>>{
           {"lora_dropout", 0.1}, {"use_dora", true}, {"fan_in_fan_out", true}, {"lora_bias", true}}) {
    auto j = good_config;
    j[field] = value;
    refused(j, good_weights, {"adapter_config.json: " + field});
  }
  {  // target_parameters not a list of names
    auto j = good_config;
    j["target_parameters"] = ".*experts.*";
    refused(j, good_weights, {"target_parameters", "list of parameter names"});
  }
  {  // one expert stored [E, in, out] with is_transposed: PEFT itself cannot compute it
    toy::MoEConfig one = c;
    one.experts = 1;
    one.top_k = 1;
    auto single = adapted_moe(one);
    peft::hf::save_adapter(*single, dir / "single");
    torch::manual_seed(21);
    toy::ToyMoE fresh(one);
    const auto before = snapshot(*fresh);
    EXPECT_THAT([&] { peft::hf::load_adapter(*fresh, dir / "single", "default",
                                             peft::hf::ExpertOptions().storage(peft::hf::ExpertStorage::in_out)); },
                ::testing::ThrowsMessage<peft::PeftError>(AllOf(HasSubstr("one expert"), HasSubstr("in_out"))));
    EXPECT_TRUE(same(before, snapshot(*fresh)));
    peft::hf::SaveAdapterOptions o;
    o.experts.storage(peft::hf::ExpertStorage::in_out);
    EXPECT_THAT([&] { peft::hf::save_adapter(*single, dir / "single_in_out", o); },
                ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("one expert")));
    EXPECT_FALSE(std::filesystem::exists(dir / "single_in_out")) << "nothing was written";
  }
}

TEST(GroupedLoRA, SavingGroupedAdaptersWithDropoutIsAClearError) {
  toy::ToyMoE model;
  peft::LoRA lora({kExperts, peft::LoRAParameters().r(2).dropout(0.1)});
  peft::inject_peft_and_freeze(lora, model);
  d9d_test::TempDir dir;
  EXPECT_THAT([&] { peft::hf::save_adapter(*model, dir / "adapter"); },
              ::testing::ThrowsMessage<peft::PeftError>(
                  AllOf(HasSubstr("'layers.0.moe.experts.gate_proj'"), HasSubstr("target_parameters, which take no dropout"))));
  EXPECT_FALSE(std::filesystem::exists(dir / "adapter")) << "nothing was written";
}
