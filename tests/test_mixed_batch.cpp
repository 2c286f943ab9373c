// Mixed batches (MixedBatchScope): each row through its own adapter. Checked
// against real PEFT's `adapter_names=` logits (fixtures/hf_peft/toy/mixed_batch)
// and, for many adapters of different ranks, scales, DoRA and embeddings,
// against one single-adapter forward per row.
#include "test_util.h"
#include "toy_model.h"

#include <d9d/peft.h>

#include <c10/core/InferenceMode.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>

namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::AllOf;
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

at::Tensor mixed_ids() { return ms::SafetensorsFile::open(kMixed + "/inputs.safetensors")->get("input_ids"); }

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

/// The toy model with `count` random adapters `a0`, `a1`, ... of different
/// ranks and scales; every third is DoRA (unless `dora` is false), every
/// fourth rsLoRA, the odd ones also adapt the embedding.
toy::Toy many_adapters(int count, uint64_t seed, bool dora = true) {
  toy::Toy model = base_model();
  torch::manual_seed(seed);
  std::mt19937 rng(seed);
  for (int i = 0; i < count; ++i) {
    peft::hf::LoraConfig config;
    config.r = 1 + static_cast<int64_t>(rng() % 8);
    config.lora_alpha = 1.0 + static_cast<double>(rng() % 16);
    config.use_dora = dora && i % 3 == 2;
    config.use_rslora = i % 4 == 3;
    config.init = peft::LoRAInit::Random;  // B != 0: every adapter changes the output
    config.target_modules.names = {"q_proj", "v_proj", "down_proj"};
    if (i % 2 == 1) config.target_modules.names.push_back("embed_tokens");
    if (i % 5 == 4) config.target_modules.names = {"o_proj"};  // touches layers the others do not
    peft::hf::add_adapter(*model, "a" + std::to_string(i), config);
  }
  model->eval();
  return model;
}

/// Row `row` of `ids` through adapter `name` alone ("__base__": no adapter).
at::Tensor single_row(toy::Toy& model, const at::Tensor& ids, int64_t row, const std::string& name) {
  torch::NoGradGuard no_grad;
  const at::Tensor one = ids.narrow(0, row, 1);
  if (name == peft::kBaseAdapterName) {
    peft::DisableAdapters off(*model);
    return model->forward(one);
  }
  peft::set_adapter(*model, name);
  return model->forward(one);
}

/// The largest difference between each row of the mixed batch and that row
/// computed alone with its adapter.
double worst_row(toy::Toy& model, const std::vector<std::string>& names, const at::Tensor& ids) {
  at::Tensor mixed;
  {
    torch::NoGradGuard no_grad;
    peft::MixedBatchScope scope(*model, names);
    mixed = model->forward(ids);
  }
  double worst = 0.0;
  for (int64_t row = 0; row < ids.size(0); ++row) {
    worst = std::max(worst, max_diff(mixed[row], single_row(model, ids, row, names[static_cast<size_t>(row)])[0]));
  }
  return worst;
}

bool any_layer_in_a_batch(const torch::nn::Module& model) {
  for (const auto& entry : peft::adapter_layers(model)) {
    if (entry.layer->mixed_batch() != nullptr) return true;
  }
  return false;
}

}  // namespace

TEST(MixedBatch, ReproducesPeftsAdapterNamesLogits) {
  toy::Toy model = base_model();
  peft::hf::load_adapter(*model, kMixed + "/a", "a");
  peft::hf::load_adapter(*model, kMixed + "/b", "b");
  // adapter_names.json, as PEFT was called: one row each.
  const std::vector<std::string> rows = {"__base__", "a", "b"};
  at::Tensor logits;
  {
    torch::NoGradGuard no_grad;
    peft::MixedBatchScope scope(*model, rows);
    logits = model->forward(mixed_ids());
  }
  const at::Tensor expected = ms::SafetensorsFile::open(kMixed + "/expected.safetensors")->get("logits");
  EXPECT_LE(max_diff(logits, expected), 1e-5);
  // The rows really differ: the base row is not adapter a's, a's is not b's.
  EXPECT_GT(max_diff(logits[0], logits[1]), 1e-3);
  EXPECT_GT(max_diff(logits[1], logits[2]), 1e-3);
  EXPECT_FALSE(any_layer_in_a_batch(*model)) << "the scope ends with its block";
}

TEST(MixedBatch, SixteenAdaptersEqualOneSingleAdapterForwardPerRow) {
  toy::Toy model = many_adapters(16, 11);
  // 40 rows: every adapter, several rows each, out of order, and base rows.
  const int64_t rows = 40;
  std::vector<std::string> names;
  std::mt19937 rng(3);
  for (int64_t i = 0; i < rows; ++i) {
    const auto pick = rng() % 18;
    names.push_back(pick >= 16 ? peft::kBaseAdapterName : "a" + std::to_string(pick));
  }
  for (int i = 0; i < 16; ++i) names[static_cast<size_t>(i)] = "a" + std::to_string(15 - i);  // all 16 used
  const at::Tensor ids = torch::randint(0, 37, {rows, 9});
  EXPECT_EQ(peft::MixedBatch(names).segments().size(), 16u);
  EXPECT_LE(worst_row(model, names, ids), 1e-5);
  // The rows of one adapter, computed apart, are not what another computes.
  EXPECT_GT(max_diff(single_row(model, ids, 0, "a0"), single_row(model, ids, 0, "a1")), 1e-3);
}

TEST(MixedBatch, EvenSegmentsOfPlainAdaptersMatchTooThroughTheBatchedProducts) {
  // Segments of equal size, no DoRA: the layers run all adapters as two
  // batched products (ranks padded with zeros to the largest, rows to the
  // largest segment). Ranks and scales differ per adapter, rsLoRA included.
  toy::Toy model = many_adapters(8, 17, /*dora=*/false);
  std::vector<std::string> names;
  for (int i = 0; i < 32; ++i) names.push_back("a" + std::to_string((i * 5) % 8));
  EXPECT_LE(worst_row(model, names, torch::randint(0, 37, {32, 6})), 1e-5);
  // Uneven but within twice the rows, with base rows between.
  names = {"a0", "a0", "a1", "__base__", "a2", "a2", "a2", "a1", "__base__", "a3"};
  EXPECT_LE(worst_row(model, names, torch::randint(0, 37, {10, 6})), 1e-5);
}

TEST(MixedBatch, DisabledAdaptersGiveTheBaseForEveryRow) {
  toy::Toy model = many_adapters(3, 5);
  const at::Tensor ids = torch::randint(0, 37, {3, 5});
  torch::NoGradGuard no_grad;
  at::Tensor base;
  {
    peft::DisableAdapters off(*model);
    base = model->forward(ids);
  }
  peft::MixedBatchScope scope(*model, {"a0", "a1", "a2"});
  peft::DisableAdapters off(*model);
  EXPECT_TRUE(torch::equal(model->forward(ids), base));
}

namespace {

/// Gradients of a mixed batch's loss against each adapter's own rows computed
/// alone, for `count` adapters on `rows`.
void expect_gradients_from_own_rows(toy::Toy& model, int count, const std::vector<std::string>& rows) {
  model->train();  // no dropout configured: the mode changes nothing else
  std::vector<std::string> all;
  for (int i = 0; i < count; ++i) all.push_back("a" + std::to_string(i));
  peft::set_adapter(*model, all);  // every adapter trains
  const at::Tensor ids = torch::randint(0, 37, {static_cast<int64_t>(rows.size()), 4});

  std::map<std::string, at::Tensor> mixed_grads;
  {
    peft::MixedBatchScope scope(*model, rows);
    model->forward(ids).pow(2).sum().backward();
  }
  for (const auto& p : model->named_parameters()) {
    if (p.value().requires_grad() && p.value().grad().defined()) {
      mixed_grads[p.key()] = p.value().grad().clone();
      p.value().mutable_grad().zero_();
    }
  }
  ASSERT_FALSE(mixed_grads.empty());

  // The reference: each adapter alone on its own rows, gradients summed.
  for (const auto& name : all) {
    std::vector<int64_t> mine;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (rows[i] == name) mine.push_back(static_cast<int64_t>(i));
    }
    peft::set_adapter(*model, name);
    model->forward(ids.index_select(0, torch::tensor(mine))).pow(2).sum().backward();
  }
  size_t compared = 0;
  for (const auto& p : model->named_parameters()) {
    const auto it = mixed_grads.find(p.key());
    if (it == mixed_grads.end()) continue;
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_LE(max_diff(it->second, p.value().grad()), 1e-4 * std::max(1.0, it->second.abs().max().item<double>()))
        << p.key();
    ++compared;
  }
  EXPECT_EQ(compared, mixed_grads.size());
  for (const auto& p : model->named_parameters()) {
    if (p.key().find("base.") != std::string::npos) {
      EXPECT_FALSE(p.value().grad().defined()) << p.key() << ": the base is frozen";
    }
  }
}

}  // namespace

TEST(MixedBatch, GradientsReachEachAdapterFromItsOwnRows) {
  {
    SCOPED_TRACE("segment by segment (a2 is DoRA)");
    toy::Toy model = many_adapters(3, 21);
    expect_gradients_from_own_rows(model, 3, {"a1", "a0", "__base__", "a1", "a2", "a0"});
  }
  {
    SCOPED_TRACE("batched products");
    toy::Toy model = many_adapters(3, 22, /*dora=*/false);
    expect_gradients_from_own_rows(model, 3, {"a1", "a0", "a2", "a1", "a2", "a0"});
  }
}

TEST(MixedBatch, BadUseIsRefusedNamingWhatIsWrongAndChangesNothing) {
  toy::Toy model = many_adapters(2, 8);
  const at::Tensor ids = torch::randint(0, 37, {2, 5});

  EXPECT_THAT([&] { peft::MixedBatchScope scope(*model, {}); },
              ThrowsMessage<peft::PeftError>(HasSubstr("one per row of the batch")));
  EXPECT_THAT([&] { peft::MixedBatchScope scope(*model, {"a0", "nope"}); },
              ThrowsMessage<peft::PeftError>(
                  AllOf(HasSubstr("row 1 names adapter \"nope\""), HasSubstr("it holds: a0, a1"))));
  EXPECT_FALSE(any_layer_in_a_batch(*model)) << "a refused scope sets nothing";

  {
    peft::MixedBatchScope scope(*model, {"a0", "a1", "a0"});
    torch::NoGradGuard no_grad;
    EXPECT_THAT([&] { model->forward(ids); },
                ThrowsMessage<peft::PeftError>(AllOf(HasSubstr("embed_tokens"), HasSubstr("for 3 rows"),
                                                     HasSubstr("has 2"))));
    EXPECT_THAT([&] { peft::MixedBatchScope nested(*model, {"a0", "a1"}); },
                ThrowsMessage<peft::PeftError>(HasSubstr("already inside a MixedBatchScope")));
  }
  EXPECT_FALSE(any_layer_in_a_batch(*model));

  // A merged adapter, as in PEFT: unmerge first.
  auto* q = model->named_modules()["layers.0.attention.q_proj"]->as<peft::LoRALinearImpl>();
  ASSERT_NE(q, nullptr);
  q->merge_adapter("a0");
  EXPECT_THAT([&] { peft::MixedBatchScope scope(*model, {"a0", "a1"}); },
              ThrowsMessage<peft::PeftError>(AllOf(HasSubstr("layers.0.attention.q_proj"), HasSubstr("merged"),
                                                   HasSubstr("unmerge"))));
  EXPECT_FALSE(any_layer_in_a_batch(*model));
  q->unmerge_adapter("a0");

  // A method that cannot mix a batch is named.
  toy::Toy with_ia3 = base_model();
  peft::hf::IA3Config ia3;
  ia3.target_modules.names = {"k_proj"};
  peft::IA3 method(ia3, "ia3");
  peft::inject_peft_and_freeze(method, with_ia3);
  peft::hf::LoraConfig lora;
  lora.target_modules.names = {"q_proj"};
  peft::hf::add_adapter(*with_ia3, "lora", lora);
  EXPECT_THAT([&] { peft::MixedBatchScope scope(*with_ia3, {"lora"}); },
              ThrowsMessage<peft::PeftError>(AllOf(HasSubstr("layers.0.attention.k_proj"), HasSubstr("IA3"),
                                                   HasSubstr("cannot compute a mixed batch"))));
  EXPECT_FALSE(any_layer_in_a_batch(*with_ia3));
}

TEST(MixedBatch, AfterTheScopeTheModelComputesItsActiveAdapterAgain) {
  toy::Toy model = many_adapters(2, 4);
  peft::set_adapter(*model, "a1");
  const at::Tensor ids = torch::randint(0, 37, {2, 6});
  torch::NoGradGuard no_grad;
  const at::Tensor before = model->forward(ids);
  {
    peft::MixedBatchScope scope(*model, {"a0", "__base__"});
    EXPECT_FALSE(torch::allclose(model->forward(ids), before));
  }
  EXPECT_TRUE(torch::equal(model->forward(ids), before));
}

TEST(MixedBatch, AMergeInsideTheScopeAndTheReservedNameAreRefused) {
  toy::Toy model = many_adapters(2, 9);
  const at::Tensor ids = torch::randint(0, 37, {2, 5});
  {
    peft::MixedBatchScope scope(*model, {"a0", "a1"});
    peft::merge_adapters_in_place(*model, {"a0"});
    torch::NoGradGuard no_grad;
    // Its rows would get a0 twice: once merged, once as the low-rank term.
    EXPECT_THAT([&] { model->forward(ids); },
                ThrowsMessage<peft::PeftError>(AllOf(HasSubstr("layers.0.attention.q_proj"),
                                                     HasSubstr("merged inside a MixedBatchScope"))));
  }
  peft::unmerge_adapters(*model);
  peft::hf::LoraConfig config;
  config.target_modules.names = {"q_proj"};
  EXPECT_THAT([&] { peft::hf::add_adapter(*model, "__base__", config); },
              ThrowsMessage<peft::PeftError>(HasSubstr("\"__base__\" is reserved")));
  EXPECT_EQ(peft::adapter_names(*model).size(), 2u);
}

TEST(MixedBatch, AForwardUnderInferenceModeThenOneWithGradInTheSameScope) {
  toy::Toy model = many_adapters(2, 10, /*dora=*/false);
  peft::set_adapter(*model, std::vector<std::string>{"a0", "a1"});
  const at::Tensor ids = torch::randint(0, 37, {4, 5});
  peft::MixedBatchScope scope(*model, {"a1", "a0", "a0", "__base__"});
  at::Tensor served;
  {
    c10::InferenceMode inference;
    served = model->forward(ids);
  }
  // The plan's cached indices were made under InferenceMode; backward saves them.
  const at::Tensor trained = model->forward(ids);
  trained.pow(2).sum().backward();
  EXPECT_LE(max_diff(served, trained.detach()), 1e-6);
  const auto* q = model->named_modules()["layers.0.attention.q_proj"]->as<peft::LoRALinearImpl>();
  ASSERT_NE(q, nullptr);
  EXPECT_TRUE(q->lora_A->weight.grad().defined());
}

TEST(MixedBatch, AReusedPlanFollowsWeightsChangedInPlace) {
  // A layer keeps the stacked weights of the last batch for the next one with
  // the same rows; a weight changed in place (an optimizer step) must show.
  toy::Toy model = many_adapters(4, 12, /*dora=*/false);
  std::vector<std::string> names;
  for (int i = 0; i < 8; ++i) names.push_back("a" + std::to_string(i % 4));
  const at::Tensor ids = torch::randint(0, 37, {8, 5});
  auto mixed = [&] {
    torch::NoGradGuard no_grad;
    peft::MixedBatchScope scope(*model, names);
    return model->forward(ids);
  };
  const at::Tensor first = mixed();
  EXPECT_TRUE(torch::equal(mixed(), first)) << "the same batch again, from the kept plan";
  {
    torch::NoGradGuard no_grad;
    auto* q = model->named_modules()["layers.0.attention.q_proj"]->as<peft::LoRALinearImpl>();
    ASSERT_NE(q, nullptr);
    q->adapter("a2").lora_B->weight.mul_(3.0);
  }
  const at::Tensor after = mixed();
  EXPECT_GT(max_diff(after, first), 1e-4);
  EXPECT_LE(worst_row(model, names, ids), 1e-5);
}
