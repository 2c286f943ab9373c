// OFT: the rotation against the Cayley formulas written out, the layer
// against PEFT's forward and merge, the config as PEFT reads and writes it,
// PEFT's fixture, training, and adapter files through the registry. Random
// PEFT configs both ways are in tests/peft_reference (OFT cases).
#include "test_util.h"
#include "toy_model.h"

#include <d9d/peft.h>

#include <torch/nn/functional/linear.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/adamw.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
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

/// The skew-symmetric block from its upper triangle, element by element (row-major, as triu_indices).
at::Tensor skew_by_hand(const at::Tensor& row, int64_t b) {
  auto q = torch::zeros({b, b}, row.options());
  int64_t k = 0;
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = i + 1; j < b; ++j, ++k) {
      q[i][j] = row[k];
      q[j][i] = -row[k];
    }
  }
  return q;
}

/// PEFT's Neumann branch written as a sum: I + 2(Q + ... + Q^(k-2)) + Q^(k-1) (k >= 4).
at::Tensor neumann_by_hand(const at::Tensor& q, int64_t k) {
  auto eye = torch::eye(q.size(0), q.options());
  auto sum = eye.clone(), power = eye.clone();
  for (int64_t p = 1; p <= k - 2; ++p) {
    power = power.mm(q);
    sum = sum + 2 * power;
  }
  return sum + power.mm(q);
}

/// The block-diagonal rotation of an adapter from the formulas above.
at::Tensor rotation_by_hand(const peft::OFTLinearAdapterImpl& a) {
  const auto& o = a.options();
  const int64_t b = a.blocks().block_size;
  std::vector<at::Tensor> blocks;
  for (int64_t i = 0; i < a.blocks().r; ++i) {
    const auto q = skew_by_hand(a.oft_R->weight.detach()[o.block_share() ? 0 : i].to(at::kDouble), b);
    const auto eye = torch::eye(b, q.options());
    blocks.push_back(o.use_cayley_neumann() ? neumann_by_hand(q, o.num_cayley_neumann_terms())
                                            : (eye - q).mm(torch::inverse(eye + q)));
  }
  return torch::block_diag(blocks).to(at::kFloat);
}

peft::hf::OFTConfig config_of(std::vector<std::string> targets, int64_t block_size = 4) {
  peft::hf::OFTConfig c;
  c.target_modules.names = std::move(targets);
  c.oft_block_size = block_size;
  c.init_weights = false;
  return c;
}

}  // namespace

TEST(OFTMath, CayleyExactIsOrthogonalAndNeumannIsWithinItsBound) {
  torch::manual_seed(0);
  const int64_t b = 5;
  const auto vec = 0.05 * torch::randn({3, b * (b - 1) / 2}, at::kDouble);
  const auto exact = peft::oft::cayley(vec, b, /*neumann=*/false, 5);
  const auto series = peft::oft::cayley(vec, b, /*neumann=*/true, 5);
  const auto eye = torch::eye(b, at::kDouble);
  for (int64_t i = 0; i < 3; ++i) {
    const auto q = skew_by_hand(vec[i], b);
    EXPECT_LE(max_diff(q, -q.t()), 0.0);
    // PEFT's exact branch solves X (I + Q) = I - Q.
    EXPECT_LE(max_diff(exact[i], (eye - q).mm(torch::inverse(eye + q))), 1e-12);
    EXPECT_LE(max_diff(exact[i].mm(exact[i].t()), eye), 1e-12) << "the exact Cayley transform is orthogonal";
    EXPECT_LE(max_diff(series[i], neumann_by_hand(q, 5)), 1e-12);
    // Its Neumann branch truncates (I + Q)(I - Q)⁻¹ = I + 2 Σ Q^p: the tail is
    // Q⁴ + 2 Σ_{p≥5} Q^p, at most n⁴ + 2 n⁵ / (1 - n) with n = ‖Q‖_F.
    const double n = q.norm().item<double>();
    ASSERT_LT(n, 0.5);
    const auto full = (eye + q).mm(torch::inverse(eye - q));
    const double err = (series[i] - full).norm().item<double>();
    EXPECT_LE(err, std::pow(n, 4) + 2 * std::pow(n, 5) / (1 - n));
    EXPECT_GT(err, 0.0);
    EXPECT_GT(max_diff(exact[i], eye), 1e-3);
  }
  // Terms 1 and 2: I and I + 2Q; 3 as 4 (PEFT's loop adds Q³ once either way).
  EXPECT_LE(max_diff(peft::oft::cayley(vec, b, true, 1)[0], eye), 0.0);
  EXPECT_LE(max_diff(peft::oft::cayley(vec, b, true, 2)[1], eye + 2 * skew_by_hand(vec[1], b)), 1e-15);
  EXPECT_LE(max_diff(peft::oft::cayley(vec, b, true, 3), peft::oft::cayley(vec, b, true, 4)), 0.0);
}

TEST(OFTMath, PeftsAdjustmentOfBlockSizeAndRank) {
  // adjust_oft_parameters: the nearest divisor, the lower one on a tie, in_features above it
  // (the values PEFT 0.21's OFTLayer.adjust_oft_parameters returns for these arguments).
  EXPECT_EQ(peft::oft::adjust(16, 5), 4);
  EXPECT_EQ(peft::oft::adjust(16, 3), 2);
  EXPECT_EQ(peft::oft::adjust(16, 7), 8);
  EXPECT_EQ(peft::oft::adjust(16, 40), 16);
  EXPECT_EQ(peft::oft::adjust(40, 6), 5);
  EXPECT_EQ(peft::oft::adjust(40, 3), 2);
  const auto a = peft::oft::resolve(16, 0, 5);
  EXPECT_EQ(a.block_size, 4);
  EXPECT_EQ(a.r, 4);
  const auto b = peft::oft::resolve(40, 3, 0);
  EXPECT_EQ(b.r, 2) << "3 on 40: 2 and 4 are as near, the lower wins";
  EXPECT_EQ(b.block_size, 20);
  const auto c = peft::oft::resolve(16, 0, 16);
  EXPECT_EQ(c.r, 1);
  EXPECT_EQ(peft::oft::weight_shape(peft::oft::resolve(16, 2, 0), false), (std::vector<int64_t>{2, 28}));
  EXPECT_EQ(peft::oft::weight_shape(peft::oft::resolve(16, 2, 0), true), (std::vector<int64_t>{1, 28}));
}

TEST(OFTMath, CoftProjectsEachBlockIntoItsBall) {
  torch::manual_seed(1);
  const int64_t b = 4;
  auto vec = torch::randn({4, 6});
  vec[2].mul_(1e-6);  // inside the ball: kept
  const double eps = 1e-3, radius = eps / 2.0;  // eps / sqrt(4 blocks)
  const auto out = peft::oft::project(vec, b, eps);
  for (int64_t i = 0; i < 4; ++i) {
    const double before = skew_by_hand(vec[i], b).norm().item<double>();
    const double after = skew_by_hand(out[i], b).norm().item<double>();
    if (before <= radius) {
      EXPECT_TRUE(torch::equal(out[i], vec[i])) << i;
    } else {
      EXPECT_NEAR(after, radius, 1e-9) << i;
      EXPECT_LE(max_diff(out[i] / after, vec[i] / before), 1e-6) << "the direction stays";
    }
  }
}

TEST(OFTLayer, ForwardRotatesTheInputBlockwiseWithPeftsKeys) {
  torch::manual_seed(2);
  d9d::nn::Linear base(12, 5);
  const auto w = base->weight.detach().clone(), bias = base->bias.detach().clone();
  peft::OFTLinearImpl layer(base.ptr(), peft::OFTParameters().oft_block_size(4).init_weights(false));
  EXPECT_EQ(layer.oft_R->weight.sizes(), (std::vector<int64_t>{3, 6}));
  std::vector<std::string> keys;
  for (const auto& p : layer.named_parameters()) keys.push_back(p.key());
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, (std::vector<std::string>{"base.bias", "base.weight", "oft_R.weight"})) << "PEFT's keys";
  torch::NoGradGuard g;
  const auto x = torch::randn({2, 3, 12});
  const auto rot = rotation_by_hand(layer.adapter("default"));
  EXPECT_LE(max_diff(layer.adapter("default").rotation(), rot), 1e-6);
  EXPECT_LE(max_diff(layer.forward(x), x.matmul(rot).matmul(w.t()) + bias), 1e-5);
  EXPECT_GT(max_diff(layer.forward(x), x.matmul(w.t()) + bias), 1e-3);

  for (const bool neumann : {false, true}) {
    d9d::nn::Linear shared_base(12, 3);
    peft::OFTLinearImpl shared(shared_base.ptr(), peft::OFTParameters().r(2).oft_block_size(0).block_share(true)
                                                      .use_cayley_neumann(neumann).num_cayley_neumann_terms(7)
                                                      .init_weights(false));
    EXPECT_EQ(shared.oft_R->weight.sizes(), (std::vector<int64_t>{1, 15})) << "one 6x6 block for both";
    const auto r2 = rotation_by_hand(shared.adapter("default"));
    EXPECT_LE(max_diff(r2.slice(0, 0, 6).slice(1, 0, 6), r2.slice(0, 6).slice(1, 6)), 0.0);
    EXPECT_LE(max_diff(shared.forward(x), x.matmul(r2).matmul(shared_base->weight.t()) + shared_base->bias), 1e-5);
  }
}

TEST(OFTLayer, PeftsDefaultInitIsANoOp) {
  torch::manual_seed(3);
  d9d::nn::Linear base(8, 3);
  const auto x = torch::randn({2, 8});
  const auto plain = base->forward(x).detach();
  peft::OFTLinearImpl layer(base.ptr(), peft::OFTParameters().oft_block_size(4));
  EXPECT_TRUE(torch::equal(layer.oft_R->weight, torch::zeros({2, 6})));
  EXPECT_TRUE(layer.oft_R->weight.requires_grad());
  EXPECT_TRUE(torch::equal(layer.forward(x).detach(), plain));
  peft::OFTLinearImpl drawn(d9d::nn::Linear(8, 3).ptr(), peft::OFTParameters().oft_block_size(4).init_weights(false));
  const double sd = drawn.oft_R->weight.std().item<double>();
  EXPECT_GT(sd, 0.02);
  EXPECT_LT(sd, 0.3) << "N(0, 0.1) as PEFT's init_weights=False";
}

TEST(OFTLayer, MergeUnmergeDeltaAndSeveralAdapters) {
  torch::manual_seed(4);
  d9d::nn::Linear base(8, 6);
  const auto w = base->weight.detach().clone(), bias = base->bias.detach().clone();
  peft::OFTLinearImpl layer(base.ptr(), peft::OFTParameters().oft_block_size(4).init_weights(false), "a");
  layer.add_adapter("b", peft::OFTParameters().r(0).oft_block_size(2).use_cayley_neumann(false).init_weights(false));
  layer.set_active_adapters({"a", "b"});
  EXPECT_TRUE(layer.adapter("b").oft_R->weight.requires_grad());
  EXPECT_EQ(layer.adapter("b").oft_R->weight.sizes(), (std::vector<int64_t>{4, 1}));
  torch::NoGradGuard g;
  const auto x = torch::randn({3, 8});
  const auto ra = rotation_by_hand(layer.adapter("a")), rb = rotation_by_hand(layer.adapter("b"));
  const auto out = layer.forward(x);
  EXPECT_LE(max_diff(out, x.mm(ra).mm(rb).mm(w.t()) + bias), 1e-5) << "rotations applied in adapter order";

  layer.set_active_adapters({"a"});
  const auto only_a = layer.forward(x);
  EXPECT_LE(max_diff(layer.delta_weight("a"), w.mm(ra.t()) - w), 1e-6);
  layer.merge_adapter("a");
  EXPECT_LE(max_diff(base->weight, w.mm(ra.t())), 1e-6) << "PEFT's merge: (R @ Wᵀ)ᵀ";
  EXPECT_TRUE(torch::equal(base->bias, bias)) << "OFT's merge leaves the bias";
  EXPECT_LE(max_diff(layer.forward(x), only_a), 1e-5);
  EXPECT_THAT([&] { layer.merge_adapter("a"); }, ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("a")));
  layer.unmerge_adapter("a");
  EXPECT_LE(max_diff(base->weight, w), 1e-5) << "unmerge applies R⁻¹";

  layer.set_adapters_enabled(false);
  EXPECT_LE(max_diff(layer.forward(x), x.mm(w.t()) + bias), 1e-5) << "disabled: the base alone";
  layer.set_adapters_enabled(true);
  EXPECT_THAT([&] { layer.add_adapter("c", peft::IA3Parameters()); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("takes OFTParameters")));
  EXPECT_THAT([&] { layer.add_adapter("c", peft::OFTParameters().r(2).oft_block_size(4)); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("add_adapter(\"c\").oft_block_size: exactly one of r and oft_block_size")));
}

TEST(OFTLayer, CoftProjectsTheWeightInForwardAsPeftDoes) {
  torch::manual_seed(5);
  d9d::nn::Linear base(8, 4);
  peft::OFTLinearImpl layer(base.ptr(), peft::OFTParameters().oft_block_size(4).coft(true).eps(1e-2).init_weights(false));
  const auto before = layer.oft_R->weight.detach().clone();
  torch::NoGradGuard g;
  const auto x = torch::randn({2, 8});
  const auto expected = peft::oft::project(before, 4, 1e-2);
  layer.forward(x);
  EXPECT_TRUE(torch::equal(layer.oft_R->weight, expected)) << "the projection is written into the parameter";
  EXPECT_LE(skew_by_hand(layer.oft_R->weight[0], 4).norm().item<double>(), 1e-2 / std::sqrt(2.0) + 1e-7);
  const auto rot = rotation_by_hand(layer.adapter("default"));
  EXPECT_LE(max_diff(layer.forward(x), x.mm(rot).mm(base->weight.t()) + base->bias), 1e-6);
}

TEST(OFTFiles, PeftsFixtureGivesPeftsLogitsMergedWeightsAndOfflineMerge) {
  const std::string dir = kToy + "/tuners/oft";
  const auto expected = ms::SafetensorsFile::open(dir + "/expected.safetensors");
  const auto ids = toy_ids();
  toy::Toy model = toy_base();
  auto method = peft::hf::load_adapter(*model, dir);
  EXPECT_NE(dynamic_cast<peft::OFT*>(method.get()), nullptr) << "the registry picked OFT from peft_type";
  torch::NoGradGuard g;
  const auto plain = toy_base()->forward(ids);
  EXPECT_GT(max_diff(expected->get("logits"), plain), 1e-3) << "the fixture's adapter changes the logits";
  const double logits_diff = max_diff(model->forward(ids), expected->get("logits"));
  EXPECT_LE(logits_diff, 1e-5);
  std::printf("OFT fixture: max |logits - PEFT| = %.3g\n", logits_diff);
  peft::merge_peft(*method, model);
  EXPECT_NE(model->named_modules()["layers.0.attention.q_proj"]->as<d9d::nn::LinearImpl>(), nullptr);
  EXPECT_LE(max_diff(model->forward(ids), expected->get("merged_logits")), 1e-5);
  TempDir out;
  peft::hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", dir, out / "merged", 1.0, ms::no_progress());
  const auto offline = ms::SafetensorsFile::open(out / "merged/model.safetensors");
  const auto state = ms::module_state_dict(*model);
  size_t merged = 0;
  for (const auto& key : expected->keys()) {
    if (key.rfind("merged.", 0) != 0) continue;
    ++merged;
    const std::string name = key.substr(7);
    EXPECT_LE(max_diff(state.at(name), expected->get(key)), 1e-5) << name;
    EXPECT_LE(max_diff(offline->get(name), expected->get(key)), 1e-5) << "offline " << name;
  }
  EXPECT_EQ(merged, 4u);
  EXPECT_THAT([&] {
    peft::hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", dir, out / "scaled", 0.5, ms::no_progress());
  }, ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("cannot be scaled")));

  const std::string cli = D9D_PEFT_CLI;
  ASSERT_EQ(std::system(("'" + cli + "' merge --base '" + kToy + "/model.safetensors' --adapter '" + dir + "' --out '" +
                         (out / "cli") + "' > '" + (out / "merge.log") + "' 2>&1")
                            .c_str()),
            0)
      << read_bytes(out / "merge.log");
  const auto by_cli = ms::SafetensorsFile::open(out / "cli/model.safetensors");
  for (const auto& key : expected->keys()) {
    if (key.rfind("merged.", 0) == 0) EXPECT_LE(max_diff(by_cli->get(key.substr(7)), expected->get(key)), 1e-5) << key;
  }
  ASSERT_EQ(std::system(("'" + cli + "' inspect '" + dir + "' > '" + (out / "inspect.log") + "' 2>&1").c_str()), 0);
  const std::string shown = read_bytes(out / "inspect.log");
  EXPECT_THAT(shown, HasSubstr("OFT"));
  EXPECT_THAT(shown, HasSubstr("base_model.model.layers.1.attention.v_proj.oft_R.weight"));
}

TEST(OFTMethod, TrainingLowersTheLossAndChangesOnlyOFTTensors) {
  toy::Toy model = toy_base();
  const auto ids = toy_ids();
  torch::manual_seed(6);
  auto config = config_of({}, 8);
  config.target_modules.regex = ".*(q|v|down)_proj";
  config.init_weights = true;
  peft::OFT oft(config);
  peft::inject_peft_and_freeze(oft, model);
  std::map<std::string, at::Tensor> before;
  for (const auto& p : model->named_parameters()) before[p.key()] = p.value().detach().clone();
  const auto trainable = peft::trainable_parameters(*model);
  EXPECT_EQ(trainable.size(), 2u * 3u) << "2 layers x 3 projections, one oft_R each";
  auto loss_of = [&] {
    auto logits = model->forward(ids.slice(1, 0, -1));
    return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), ids.slice(1, 1).reshape({-1}));
  };
  model->train();
  torch::optim::AdamW opt(trainable, torch::optim::AdamWOptions(1e-2));
  const double first = loss_of().item<double>();
  for (int step = 0; step < 10; ++step) {
    opt.zero_grad();
    loss_of().backward();
    opt.step();
  }
  model->eval();
  torch::NoGradGuard g;
  EXPECT_LT(loss_of().item<double>(), first - 1e-3);
  size_t changed = 0;
  for (const auto& p : model->named_parameters()) {
    const bool is_oft = p.key().find(".oft_R.") != std::string::npos;
    const bool same = torch::equal(p.value(), before.at(p.key()));
    if (is_oft) changed += !same;
    else EXPECT_TRUE(same) << p.key() << " is not an OFT tensor but changed";
  }
  EXPECT_EQ(changed, trainable.size());
  const auto unmerged = model->forward(ids);
  peft::merge_peft(oft, model);
  EXPECT_LE(max_diff(model->forward(ids), unmerged), 1e-5);
}

TEST(OFTFiles, SaveThenLoadThroughTheRegistryRoundTrips) {
  const auto ids = toy_ids();
  toy::Toy model = toy_base();
  torch::manual_seed(7);
  auto config = config_of({"v_proj", "up_proj", "down_proj"}, 0);
  config.r = 4;
  config.coft = true;
  config.eps = 0.1;
  config.use_cayley_neumann = false;
  peft::OFT oft(config);
  peft::inject_peft_and_freeze(oft, model);
  TempDir dir;
  peft::hf::save_adapter(*model, dir.str());
  const auto written = nlohmann::json::parse(read_bytes(dir / "adapter_config.json"));
  EXPECT_EQ(written["peft_type"], "OFT");
  EXPECT_EQ(written["r"], 4);
  EXPECT_EQ(written["oft_block_size"], 0);
  EXPECT_EQ(written["coft"], true);
  EXPECT_EQ(written["use_cayley_neumann"], false);
  const auto weights = ms::SafetensorsFile::open(dir / "adapter_model.safetensors");
  EXPECT_EQ(weights->get("base_model.model.layers.0.mlp.down_proj.oft_R.weight").sizes(),
            (std::vector<int64_t>{4, 45})) << "in 40: 4 blocks of 10";
  EXPECT_EQ(weights->get("base_model.model.layers.1.attention.v_proj.oft_R.weight").sizes(),
            (std::vector<int64_t>{4, 6}));

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

TEST(OFTMethod, MergeRefusesNaNAndLeavesTheModel) {
  toy::Toy model = toy_base();
  peft::OFT oft(config_of({"q_proj"}));
  peft::inject_peft_and_freeze(oft, model);
  auto* q = model->named_modules()["layers.0.attention.q_proj"]->as<peft::OFTLinearImpl>();
  ASSERT_NE(q, nullptr);
  const auto w = q->base_weight().clone();
  {
    torch::NoGradGuard g;
    q->oft_R->weight[0][0] = NAN;
  }
  EXPECT_THAT([&] { peft::merge_peft(oft, model); },
              ::testing::ThrowsMessage<peft::PeftError>(HasSubstr("NaN or Inf")));
  EXPECT_TRUE(torch::equal(q->base_weight(), w));
  EXPECT_NE(model->named_modules()["layers.0.attention.q_proj"]->as<peft::OFTLinearImpl>(), nullptr);
}

TEST(OFTConfig, PeftsFieldsAndErrorsNameTheField) {
  const auto c = peft::hf::parse_oft_config(
      nlohmann::json::parse(read_bytes(kToy + "/tuners/oft/adapter_config.json")), "adapter_config.json");
  EXPECT_EQ(c.r, 0);
  EXPECT_EQ(c.oft_block_size, 4);
  EXPECT_TRUE(c.use_cayley_neumann);
  EXPECT_EQ(c.num_cayley_neumann_terms, 5);
  EXPECT_DOUBLE_EQ(c.eps, 6e-5);
  EXPECT_FALSE(c.init_weights);
  EXPECT_TRUE(c.select("layers.0.attention.v_proj").has_value());
  EXPECT_FALSE(c.select("layers.0.attention.k_proj").has_value());
  auto error_of = [](const std::string& text) {
    try {
      peft::hf::parse_oft_config(nlohmann::json::parse(text), "cfg");
    } catch (const peft::ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"r":4})"),
              HasSubstr("cfg: oft_block_size: exactly one of r and oft_block_size must be non-zero"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"oft_block_size":0})"),
              HasSubstr("cfg: r: exactly one of r and oft_block_size"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"oft_block_size":-2})"),
              HasSubstr("cfg: oft_block_size: must be an integer >= 0"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"num_cayley_neumann_terms":0})"),
              HasSubstr("cfg: num_cayley_neumann_terms: must be an integer >= 1"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"coft":1})"),
              HasSubstr("cfg: coft: expected true or false"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"bias":"all"})"),
              HasSubstr("cfg: bias: \"all\" is not supported"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"fan_in_fan_out":true})"),
              HasSubstr("cfg: fan_in_fan_out: true is not supported"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"layers_to_transform":[0]})"),
              HasSubstr("cfg: layers_to_transform: [0] is not supported"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"modules_to_save":["lm_head"]})"),
              HasSubstr("cfg: modules_to_save: "));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT","target_modules":["q"],"oft_dropout":0.1})"),
              HasSubstr("cfg: oft_dropout: 0.1 is not supported"));
  EXPECT_THAT(error_of(R"({"peft_type":"OFT"})"), HasSubstr("cfg: target_modules: must name the modules"));
  const auto again = peft::hf::parse_oft_config(nlohmann::json::parse(peft::hf::dump_oft_config(c)), "dumped");
  EXPECT_EQ(again.target_modules.names, c.target_modules.names);
  EXPECT_EQ(again.oft_block_size, c.oft_block_size);
  EXPECT_EQ(again.r, c.r);
  EXPECT_EQ(again.eps, c.eps);
  EXPECT_EQ(again.init_weights, c.init_weights);
}

TEST(OFTConfig, D9dJsonParsesDumpsAndStacksWithLora) {
  const std::string text =
      R"json({"kind":"oft","module_name_pattern":".*(k_proj|down_proj)","params":{"r":0,"oft_block_size":4,"coft":false,"eps":6e-05,"block_share":false,"use_cayley_neumann":true,"num_cayley_neumann_terms":5,"module_dropout":0.0,"init_weights":true}})json";
  EXPECT_EQ(peft::dump_peft_config(peft::parse_peft_config(text)), text);
  const auto short_form = peft::parse_peft_config(R"json({"kind":"oft","module_name_pattern":"x","params":{"r":2}})json");
  EXPECT_EQ(short_form.get<peft::OFTConfig>().params.oft_block_size(), 0) << "the one given decides";
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"oft","module_name_pattern":"x","params":{}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.oft_block_size: field required")));
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"oft","module_name_pattern":"x","params":{"r":2,"oft_block_size":4}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.oft_block_size: exactly one of r and oft_block_size")));
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"oft","module_name_pattern":"x","params":{"r":2,"eps":-1}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("params.eps: must be a finite number >= 0")));
  EXPECT_THAT([] { peft::parse_peft_config(R"json({"kind":"oft","module_name_pattern":"x","params":{"r":2,"alpha":2}})json"); },
              ::testing::ThrowsMessage<peft::ConfigError>(HasSubstr("alpha")));
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
  auto* down = model->named_modules()["layers.0.mlp.down_proj"]->as<peft::OFTLinearImpl>();
  ASSERT_NE(down, nullptr);
  EXPECT_TRUE(down->oft_R->weight.requires_grad());
  EXPECT_LE(max_diff(model->forward(ids), plain), 1e-6) << "fresh LoRA and OFT are no-ops";
}
