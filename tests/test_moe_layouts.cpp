// Mixture-of-experts checkpoint layouts (mapper/moe.h): per-expert linears and
// the fused tensors of transformers 5.x, loaded into grouped [E, in, out]
// weights and saved back bit-exactly.
#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/mapper/compose/sequential.h>
#include <d9d/model_state/mapper/leaf/rename.h>
#include <d9d/model_state/mapper/moe.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "test_util.h"

namespace ms = d9d::model_state;
using d9d_test::quiet;
using d9d_test::quiet_save;
using d9d_test::read_bytes;
using d9d_test::TempDir;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

namespace {

constexpr int64_t kD = 6, kFf = 10, kLayers = 2;

/// Stands in for a grouped linear: one parameter `weight` [G, in, out].
struct GroupedWeightImpl : torch::nn::Module {
  GroupedWeightImpl(int64_t groups, int64_t in, int64_t out) {
    weight = register_parameter("weight", torch::zeros({groups, in, out}));
  }
  torch::Tensor weight;
};
TORCH_MODULE(GroupedWeight);

struct ExpertsImpl : torch::nn::Module {
  explicit ExpertsImpl(int64_t experts)
      : gate_proj(register_module("gate_proj", GroupedWeight(experts, kD, kFf))),
        up_proj(register_module("up_proj", GroupedWeight(experts, kD, kFf))),
        down_proj(register_module("down_proj", GroupedWeight(experts, kFf, kD))) {}
  GroupedWeight gate_proj, up_proj, down_proj;
};
TORCH_MODULE(Experts);

struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(int64_t experts)
      : gate(register_module("gate", torch::nn::Linear(torch::nn::LinearOptions(kD, experts).bias(false)))),
        experts(register_module("experts", Experts(experts))) {}
  torch::nn::Linear gate;
  Experts experts;
};
TORCH_MODULE(Mlp);

/// `model.embed.weight`, `model.layers.<i>.mlp.{gate,experts}`: the keys of a
/// transformers MoE model, with the experts grouped.
struct MoeModelImpl : torch::nn::Module {
  explicit MoeModelImpl(int64_t experts) {
    auto model = register_module("model", std::make_shared<torch::nn::Module>());
    embed = model->register_module("embed", torch::nn::Embedding(11, kD))->weight;
    auto layers = model->register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < kLayers; ++i) {
      auto layer = std::make_shared<torch::nn::Module>();
      mlps.push_back(layer->register_module("mlp", Mlp(experts)));
      layers->push_back(layer);
    }
  }
  torch::Tensor embed;
  std::vector<Mlp> mlps;
};
TORCH_MODULE(MoeModel);

std::string experts_prefix(int64_t layer, const std::string& block = "mlp") {
  return "model.layers." + std::to_string(layer) + "." + block + ".experts";
}

/// A transformers 4.x checkpoint: random per-expert linears `[out, in]` under
/// `<block>.experts.<e>.<name>.weight`, the router and the embedding.
ms::StateDict per_expert_checkpoint(int64_t experts, const std::array<std::string, 3>& names,
                                    const std::string& block = "mlp") {
  torch::manual_seed(7);
  ms::StateDict out{{"model.embed.weight", torch::randn({11, kD})}};
  for (int64_t i = 0; i < kLayers; ++i) {
    const auto layer = "model.layers." + std::to_string(i) + ".";
    out[layer + "mlp.gate.weight"] = torch::randn({experts, kD});
    for (int64_t e = 0; e < experts; ++e) {
      const auto p = experts_prefix(i, block) + "." + std::to_string(e) + ".";
      out[p + names[0] + ".weight"] = torch::randn({kFf, kD});
      out[p + names[1] + ".weight"] = torch::randn({kFf, kD});
      out[p + names[2] + ".weight"] = torch::randn({kD, kFf});
    }
  }
  return out;
}

/// `stack` of the experts' `[out, in]` weights: `[E, out, in]`.
torch::Tensor stacked(const ms::StateDict& ckpt, const std::string& prefix, int64_t experts, const std::string& name) {
  std::vector<torch::Tensor> parts;
  for (int64_t e = 0; e < experts; ++e)
    parts.push_back(ckpt.at(prefix + "." + std::to_string(e) + "." + name + ".weight"));
  return torch::stack(parts);
}

/// The fused tensors transformers 5.x holds for the same experts, built as
/// its code reads them (not by the mapper's own ops).
ms::StateDict fused_checkpoint(const ms::StateDict& per_expert, int64_t experts, ms::MoeLayout layout) {
  ms::StateDict out;
  for (const auto& item : per_expert) {
    if (item.first.find(".experts.") == std::string::npos) out.insert(item);
  }
  for (int64_t i = 0; i < kLayers; ++i) {
    const auto p = experts_prefix(i);
    const auto gate = stacked(per_expert, p, experts, "gate_proj");  // [E, ff, d]
    const auto up = stacked(per_expert, p, experts, "up_proj");
    const auto down = stacked(per_expert, p, experts, "down_proj");  // [E, d, ff]
    if (layout == ms::MoeLayout::fused) {                            // qwen3_moe: Concatenate(dim=1) of [E, ff, d]
      out[p + ".gate_up_proj"] = torch::cat({gate, up}, 1);
      out[p + ".down_proj"] = down.clone();
    } else if (layout == ms::MoeLayout::fused_in_out) {  // llama4: [E, d, 2*ff], gate | up
      out[p + ".gate_up_proj"] = torch::cat({gate.transpose(1, 2), up.transpose(1, 2)}, 2).contiguous();
      out[p + ".down_proj"] = down.transpose(1, 2).contiguous();
    } else {  // gpt_oss: [E, d, 2*ff], gate = [..., ::2], up = [..., 1::2]
      auto gate_up = torch::empty({experts, kD, 2 * kFf});
      for (int64_t j = 0; j < kFf; ++j) {
        gate_up.select(2, 2 * j).copy_(gate.select(1, j));
        gate_up.select(2, 2 * j + 1).copy_(up.select(1, j));
      }
      out[p + ".gate_up_proj"] = gate_up;
      out[p + ".down_proj"] = down.transpose(1, 2).contiguous();
    }
  }
  return out;
}

std::vector<ms::MoeExperts> layers_of(int64_t experts, ms::MoeLayout layout) {
  std::vector<ms::MoeExperts> out;
  for (int64_t i = 0; i < kLayers; ++i) out.emplace_back(experts_prefix(i), experts, layout);
  return out;
}

void write(const std::string& path, const ms::StateDict& tensors) {
  ms::save_safetensors(path, tensors, {{"format", "pt"}});
}

bool bit_equal(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  const auto ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0;
}

/// Every grouped weight equals the per-expert weights stacked and transposed to [E, in, out].
void expect_grouped(const MoeModel& model, const ms::StateDict& per_expert, int64_t experts,
                    const std::array<std::string, 3>& names, const std::string& block = "mlp") {
  for (int64_t i = 0; i < kLayers; ++i) {
    const auto p = experts_prefix(i, block);
    const auto& x = model->mlps[i]->experts;
    EXPECT_TRUE(bit_equal(x->gate_proj->weight, stacked(per_expert, p, experts, names[0]).transpose(1, 2))) << p;
    EXPECT_TRUE(bit_equal(x->up_proj->weight, stacked(per_expert, p, experts, names[1]).transpose(1, 2))) << p;
    EXPECT_TRUE(bit_equal(x->down_proj->weight, stacked(per_expert, p, experts, names[2]).transpose(1, 2))) << p;
  }
}

const std::array<std::string, 3> kHfNames = {"gate_proj", "up_proj", "down_proj"};

}  // namespace

TEST(MoeLayout, PerExpertMixtralNamesRoundTripBitExact) {
  TempDir dir;
  const int64_t experts = 4;
  // Mixtral's Hub files: block_sparse_moe.experts.<e>.{w1,w3,w2}, into mlp.experts.{gate,up,down}_proj.
  const std::array<std::string, 3> names = {"w1", "w3", "w2"};
  const auto ckpt = per_expert_checkpoint(experts, names, "block_sparse_moe");
  write(dir / "in.safetensors", ckpt);
  std::vector<ms::MoeExperts> layers;
  for (int64_t i = 0; i < kLayers; ++i) {
    layers.push_back(ms::MoeExperts(experts_prefix(i, "block_sparse_moe"), experts, ms::MoeLayout::per_expert)
                         .gate("w1")
                         .up("w3")
                         .down("w2")
                         .model_prefix(experts_prefix(i)));
  }
  MoeModel model(experts);
  const auto report =
      ms::load_model_state(dir / "in.safetensors", *ms::moe_load_mapper(*model, layers), *model, quiet());
  EXPECT_TRUE(report.ok()) << report.to_string();
  expect_grouped(model, ckpt, experts, names, "block_sparse_moe");
  EXPECT_TRUE(bit_equal(model->embed, ckpt.at("model.embed.weight")));

  ms::save_model_state(dir / "out", *ms::moe_save_mapper(*model, layers), *model, quiet_save());
  EXPECT_EQ(read_bytes(dir / "out/model.safetensors"), read_bytes(dir / "in.safetensors"));
}

TEST(MoeLayout, GroupedWeightsComputeThePerExpertLinears) {
  TempDir dir;
  const int64_t experts = 3;
  const auto ckpt = per_expert_checkpoint(experts, kHfNames);
  write(dir / "in.safetensors", ckpt);
  MoeModel model(experts);
  ms::load_model_state(dir / "in.safetensors",
                       *ms::moe_load_mapper(*model, layers_of(experts, ms::MoeLayout::per_expert)), *model, quiet());
  const auto x = torch::randn({5, kD});
  for (int64_t e = 0; e < experts; ++e) {
    const auto p = experts_prefix(1) + "." + std::to_string(e) + ".";
    const auto& grouped = model->mlps[1]->experts;
    const auto h = torch::silu(torch::mm(x, grouped->gate_proj->weight[e])) * torch::mm(x, grouped->up_proj->weight[e]);
    const auto hf_h = torch::silu(torch::nn::functional::linear(x, ckpt.at(p + "gate_proj.weight"))) *
                      torch::nn::functional::linear(x, ckpt.at(p + "up_proj.weight"));
    EXPECT_TRUE(torch::allclose(h, hf_h, 1e-5, 1e-6));
    EXPECT_TRUE(torch::allclose(torch::mm(h, grouped->down_proj->weight[e]),
                                torch::nn::functional::linear(h, ckpt.at(p + "down_proj.weight")), 1e-5, 1e-6));
  }
}

class MoeLayoutFused : public ::testing::TestWithParam<ms::MoeLayout> {};

TEST_P(MoeLayoutFused, RoundTripBitExactAndMatchesTransformersForward) {
  TempDir dir;
  const int64_t experts = 5;
  const auto per_expert = per_expert_checkpoint(experts, kHfNames);
  const auto fused = fused_checkpoint(per_expert, experts, GetParam());
  write(dir / "in.safetensors", fused);
  const auto layers = layers_of(experts, GetParam());
  MoeModel model(experts);
  const auto report =
      ms::load_model_state(dir / "in.safetensors", *ms::moe_load_mapper(*model, layers), *model, quiet());
  EXPECT_TRUE(report.ok()) << report.to_string();
  expect_grouped(model, per_expert, experts, kHfNames);

  // gate and up as the transformers module computes them from the fused tensor.
  const auto x = torch::randn({4, kD});
  const auto& gate_up = fused.at(experts_prefix(0) + ".gate_up_proj");
  for (int64_t e = 0; e < experts; ++e) {
    const auto& grouped = model->mlps[0]->experts;
    torch::Tensor hf_gate, hf_up;
    if (GetParam() == ms::MoeLayout::fused) {  // F.linear(x, gate_up_proj[e]).chunk(2, dim=-1)
      const auto parts = torch::nn::functional::linear(x, gate_up[e]).chunk(2, -1);
      hf_gate = parts[0], hf_up = parts[1];
    } else if (GetParam() == ms::MoeLayout::fused_in_out) {  // bmm(x, gate_up_proj).chunk(2, dim=-1)
      const auto parts = torch::mm(x, gate_up[e]).chunk(2, -1);
      hf_gate = parts[0], hf_up = parts[1];
    } else {  // x @ gate_up_proj[e], gate = [..., ::2], up = [..., 1::2]
      const auto y = torch::mm(x, gate_up[e]);
      hf_gate = y.slice(-1, 0, c10::nullopt, 2), hf_up = y.slice(-1, 1, c10::nullopt, 2);
    }
    EXPECT_TRUE(torch::allclose(torch::mm(x, grouped->gate_proj->weight[e]), hf_gate, 1e-5, 1e-6)) << e;
    EXPECT_TRUE(torch::allclose(torch::mm(x, grouped->up_proj->weight[e]), hf_up, 1e-5, 1e-6)) << e;
  }

  ms::save_model_state(dir / "out", *ms::moe_save_mapper(*model, layers), *model, quiet_save());
  EXPECT_EQ(read_bytes(dir / "out/model.safetensors"), read_bytes(dir / "in.safetensors"));
  const auto back = ms::open_checkpoint(dir / "out");
  for (const auto& item : fused) EXPECT_TRUE(bit_equal(back->read(item.first), item.second)) << item.first;
}

INSTANTIATE_TEST_SUITE_P(MoeLayout, MoeLayoutFused,
                         ::testing::Values(ms::MoeLayout::fused, ms::MoeLayout::fused_in_out,
                                           ms::MoeLayout::fused_in_out_interleaved),
                         [](const auto& info) { return ms::to_string(info.param); });

TEST(MoeLayout, ConvertsPerExpertToFusedAndBackThroughShards) {
  TempDir dir;
  const int64_t experts = 4;
  const auto ckpt = per_expert_checkpoint(experts, kHfNames);
  write(dir / "in.safetensors", ckpt);
  MoeModel model(experts);
  ms::load_model_state(dir / "in.safetensors",
                       *ms::moe_load_mapper(*model, layers_of(experts, ms::MoeLayout::per_expert)), *model, quiet());
  // Written fused (in shards), read back fused into a fresh model, written per expert again.
  ms::save_model_state(dir / "fused", *ms::moe_save_mapper(*model, layers_of(experts, ms::MoeLayout::fused)), *model,
                       quiet_save(4000));
  ASSERT_TRUE(d9d_test::fs::exists(dir / "fused/model.safetensors.index.json"));
  const auto fused = ms::open_checkpoint(dir / "fused");
  const auto expected = fused_checkpoint(ckpt, experts, ms::MoeLayout::fused);
  EXPECT_EQ(fused->keys().size(), expected.size());
  for (const auto& item : expected) EXPECT_TRUE(bit_equal(fused->read(item.first), item.second)) << item.first;

  MoeModel again(experts);
  ms::load_model_state(dir / "fused", *ms::moe_load_mapper(*again, layers_of(experts, ms::MoeLayout::fused)), *again,
                       quiet());
  ms::save_model_state(dir / "out", *ms::moe_save_mapper(*again, layers_of(experts, ms::MoeLayout::per_expert)), *again,
                       quiet_save());
  EXPECT_EQ(read_bytes(dir / "out/model.safetensors"), read_bytes(dir / "in.safetensors"));
}

TEST(MoeLayout, LayerMapperComposesBeforeARename) {
  // The per-layer mapper alone, with the rest passed on by Sequential, as
  // before the mapper inject_peft_and_freeze returns (x.weight -> x.base.weight).
  const int64_t experts = 2;
  const auto ckpt = per_expert_checkpoint(experts, kHfNames);
  const auto p = experts_prefix(0);
  ms::Sequential chain({ms::moe_experts_load_mapper(ms::MoeExperts(p, experts, ms::MoeLayout::per_expert)),
                        std::make_shared<ms::Rename>(p + ".up_proj.weight", p + ".up_proj.base.weight")});
  ms::StateDict group;
  for (int64_t e = 0; e < experts; ++e)
    group[p + "." + std::to_string(e) + ".up_proj.weight"] = ckpt.at(p + "." + std::to_string(e) + ".up_proj.weight");
  const auto out = chain.apply(group);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_TRUE(bit_equal(out.at(p + ".up_proj.base.weight"), stacked(ckpt, p, experts, "up_proj").transpose(1, 2)));
}

TEST(MoeLayout, MissingExpertIsNamed) {
  TempDir dir;
  const int64_t experts = 4;
  auto ckpt = per_expert_checkpoint(experts, kHfNames);
  ckpt.erase(experts_prefix(1) + ".2.up_proj.weight");
  write(dir / "in.safetensors", ckpt);
  MoeModel model(experts);
  const auto mapper = ms::moe_load_mapper(*model, layers_of(experts, ms::MoeLayout::per_expert));
  EXPECT_THAT([&] { ms::load_model_state(dir / "in.safetensors", *mapper, *model, quiet()); },
              ThrowsMessage<ms::StateLoadError>(AllOf(HasSubstr("model.layers.1.mlp.experts.2.up_proj.weight"),
                                                      HasSubstr("model.layers.1.mlp.experts.up_proj.weight"))));
}

TEST(MoeLayout, MoreExpertsInTheFileThanTheModelAreNamed) {
  TempDir dir;
  write(dir / "in.safetensors", per_expert_checkpoint(5, kHfNames));
  MoeModel model(4);
  EXPECT_THAT(
      [&] {
        ms::load_model_state(dir / "in.safetensors",
                             *ms::moe_load_mapper(*model, layers_of(4, ms::MoeLayout::per_expert)), *model, quiet());
      },
      ThrowsMessage<ms::StateLoadError>(AllOf(HasSubstr("source keys no mapper group reads"),
                                              HasSubstr("model.layers.0.mlp.experts.4.gate_proj.weight"))));
}

TEST(MoeLayout, ExpertOfAnotherShapeOrDtypeIsNamed) {
  TempDir dir;
  auto ckpt = per_expert_checkpoint(3, kHfNames);
  ckpt[experts_prefix(0) + ".1.down_proj.weight"] = torch::randn({kD, kFf + 1});
  write(dir / "in.safetensors", ckpt);
  MoeModel model(3);
  const auto mapper = ms::moe_load_mapper(*model, layers_of(3, ms::MoeLayout::per_expert));
  EXPECT_THAT([&] { ms::load_model_state(dir / "in.safetensors", *mapper, *model, quiet()); },
              ThrowsMessage<ms::MapperError>(
                  AllOf(HasSubstr("'model.layers.0.mlp.experts.1.down_proj.weight' (shape [6, 11], Float) differs "
                                  "from 'model.layers.0.mlp.experts.0.down_proj.weight' (shape [6, 10], Float)"),
                        HasSubstr("every expert of a layer has the same shape and dtype"))));

  ckpt[experts_prefix(0) + ".1.down_proj.weight"] = torch::randn({kD, kFf}).to(torch::kBFloat16);
  write(dir / "in.safetensors", ckpt);
  EXPECT_THAT([&] { ms::load_model_state(dir / "in.safetensors", *mapper, *model, quiet()); },
              ThrowsMessage<ms::MapperError>(HasSubstr("(shape [6, 10], BFloat16) differs")));
}

TEST(MoeLayout, FusedOfAnotherExpertCountOrOddWidthIsNamed) {
  TempDir dir;
  const auto fused = fused_checkpoint(per_expert_checkpoint(4, kHfNames), 4, ms::MoeLayout::fused);
  write(dir / "in.safetensors", fused);
  MoeModel model(8);
  EXPECT_THAT(
      [&] {
        ms::load_model_state(dir / "in.safetensors", *ms::moe_load_mapper(*model, layers_of(8, ms::MoeLayout::fused)),
                             *model, quiet());
      },
      ThrowsMessage<ms::MapperError>(HasSubstr(
          "'model.layers.0.mlp.experts.down_proj' (shape [4, 6, 10], Float) is not [num_experts = 8, ., .]")));

  auto odd = fused;
  odd[experts_prefix(1) + ".gate_up_proj"] = torch::randn({4, 2 * kFf + 1, kD});
  write(dir / "odd.safetensors", odd);
  MoeModel four(4);
  EXPECT_THAT(
      [&] {
        ms::load_model_state(dir / "odd.safetensors", *ms::moe_load_mapper(*four, layers_of(4, ms::MoeLayout::fused)),
                             *four, quiet());
      },
      ThrowsMessage<ms::MapperError>(
          HasSubstr("'model.layers.1.mlp.experts.gate_up_proj' (shape [4, 21, 6], Float) holds gate and up, so its "
                    "dim 1 must be even")));
}

TEST(MoeLayout, SavingAModelWithOtherExpertCountIsNamed) {
  TempDir dir;
  MoeModel model(3);
  EXPECT_THAT(
      [&] {
        ms::save_model_state(dir / "out", *ms::moe_save_mapper(*model, layers_of(4, ms::MoeLayout::per_expert)), *model,
                             quiet_save());
      },
      ThrowsMessage<ms::MapperError>(HasSubstr(
          "'model.layers.0.mlp.experts.down_proj.weight' (shape [3, 10, 6], Float) is not [num_experts = 4, ., .]")));
}

TEST(MoeLayout, BadSpecsAreRefused) {
  MoeModel model(2);
  const auto p = experts_prefix(0);
  EXPECT_THAT([&] { ms::moe_experts_load_mapper(ms::MoeExperts(p, 0, ms::MoeLayout::fused)); },
              ThrowsMessage<ms::MapperError>(HasSubstr("model.layers.0.mlp.experts: num_experts is 0")));
  EXPECT_THAT([&] { ms::moe_experts_load_mapper(ms::MoeExperts("", 2, ms::MoeLayout::fused)); },
              ThrowsMessage<ms::MapperError>(HasSubstr("the experts' prefix is empty")));
  EXPECT_THAT([&] { ms::moe_experts_save_mapper(ms::MoeExperts(p, 2, ms::MoeLayout::per_expert).up("gate_proj")); },
              ThrowsMessage<ms::MapperError>(HasSubstr("two checkpoint projections are both named 'gate_proj'")));
  EXPECT_THAT(
      [&] { ms::moe_load_mapper(*model, {ms::MoeExperts(p, 2, ms::MoeLayout::fused).model_prefix("mlp.experts")}); },
      ThrowsMessage<ms::MapperError>(HasSubstr("moe_load_mapper: the model has no 'mlp.experts.")));
  EXPECT_THAT([&] { ms::moe_save_mapper(*model, {ms::MoeExperts(p, 2, ms::MoeLayout::fused).model_up("w3")}); },
              ThrowsMessage<ms::MapperError>(
                  HasSubstr("moe_save_mapper: the model has no 'model.layers.0.mlp.experts.w3.weight'")));
}
