// State mappers (leaves, Parallel, Sequential) and strict loading.
#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>
#include <d9d/model_state/mapper/compose/parallel.h>
#include <d9d/model_state/mapper/compose/sequential.h>
#include <d9d/model_state/mapper/leaf/identity.h>
#include <d9d/model_state/mapper/leaf/rename.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace ms = d9d::model_state;
using ::testing::HasSubstr;

namespace {

ms::MapperPtr mk_rename(const std::string& from, const std::string& to) { return std::make_shared<ms::Rename>(from, to); }
ms::MapperPtr mk_identity(const std::string& name) { return std::make_shared<ms::Identity>(name); }

/// A mapper that concatenates two tensors into one (a group with two inputs).
class Concat final : public ms::ModelStateMapper {
 public:
  Concat(std::string a, std::string b, std::string out) : a_(a), b_(b), out_(out) {}
  ms::StateGroups state_dependency_groups() const override { return {{{a_, b_}, {out_}}}; }
  ms::StateDict apply(ms::StateDict group) const override {
    return {{out_, torch::cat({group.at(a_), group.at(b_)})}};
  }

 private:
  std::string a_, b_, out_;
};

struct TinyImpl : torch::nn::Module {
  TinyImpl() {
    fc = register_module("fc", torch::nn::Linear(3, 2));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({2})));
  }
  torch::nn::Linear fc{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(Tiny);

ms::StateDict tiny_checkpoint(float value) {
  return {{"fc.weight", torch::full({2, 3}, value)},
          {"fc.bias", torch::full({2}, value)},
          {"norm.weight", torch::full({2}, value)},
          {"norm.bias", torch::full({2}, value)}};
}

}  // namespace

TEST(Mapper, RenameAndIdentityDeclareOneGroup) {
  EXPECT_EQ(mk_rename("a", "b")->state_dependency_groups(), (ms::StateGroups{{{"a"}, {"b"}}}));
  EXPECT_EQ(mk_identity("a")->state_dependency_groups(), (ms::StateGroups{{{"a"}, {"a"}}}));
  auto t = torch::ones({2});
  auto out = mk_rename("a", "b")->apply({{"a", t}});
  ASSERT_EQ(out.size(), 1u);
  EXPECT_TRUE(out.at("b").is_same(t));
}

TEST(Mapper, LeafRejectsWrongGroup) {
  EXPECT_THAT([] { mk_rename("a", "b")->apply({{"c", torch::ones({1})}}); },
              ::testing::ThrowsMessage<ms::MapperError>(HasSubstr("expected a group with keys {a}, got {c}")));
}

TEST(Mapper, ParallelUnionsGroupsAndRoutes) {
  ms::Parallel p({mk_rename("a", "x"), mk_identity("b"), std::make_shared<Concat>("c", "d", "cd")});
  EXPECT_EQ(p.state_dependency_groups(),
            (ms::StateGroups{{{"a"}, {"x"}}, {{"b"}, {"b"}}, {{"c", "d"}, {"cd"}}}));
  auto out = p.apply({{"c", torch::ones({2})}, {"d", torch::zeros({3})}});
  EXPECT_EQ(out.at("cd").size(0), 5);
  EXPECT_THAT([&] { p.apply({{"c", torch::ones({2})}}); },
              ::testing::ThrowsMessage<ms::MapperError>(HasSubstr("no mapper declared a group reading exactly {c}")));
}

TEST(Mapper, ParallelRejectsCollisions) {
  EXPECT_THAT([] { ms::Parallel({mk_rename("a", "x"), mk_rename("a", "y")}); },
              ::testing::ThrowsMessage<ms::MapperError>(HasSubstr("input key 'a' is read by two mappers")));
  EXPECT_THAT([] { ms::Parallel({mk_rename("a", "x"), mk_rename("b", "x")}); },
              ::testing::ThrowsMessage<ms::MapperError>(HasSubstr("output key 'x' is written by two mappers")));
}

TEST(Mapper, ParallelDropsEmptyMappers) {
  ms::Parallel empty({});
  EXPECT_TRUE(empty.state_dependency_groups().empty());
  ms::Parallel p({std::make_shared<ms::Parallel>(std::vector<ms::MapperPtr>{}), mk_identity("a")});
  EXPECT_EQ(p.state_dependency_groups().size(), 1u);
}

TEST(Mapper, SequentialMergesChainedGroups) {
  ms::Sequential s({mk_rename("x", "y"), mk_rename("y", "z")});
  EXPECT_EQ(s.state_dependency_groups(), (ms::StateGroups{{{"x"}, {"z"}}}));
  auto t = torch::ones({1});
  EXPECT_TRUE(s.apply({{"x", t}}).at("z").is_same(t));
}

TEST(Mapper, SequentialFillsGapsBothWays) {
  // Stage 1 only renames a; stage 2 needs b (passes through stage 1) and
  // stage 1's output c is not read by stage 2 (passes through stage 2).
  ms::Sequential s({mk_rename("a", "c"), std::make_shared<Concat>("b", "e", "be")});
  EXPECT_EQ(s.state_dependency_groups(), (ms::StateGroups{{{"a"}, {"c"}}, {{"b", "e"}, {"be"}}}));
  auto out = s.apply({{"b", torch::ones({1})}, {"e", torch::ones({2})}});
  ASSERT_EQ(out.count("be"), 1u);
  EXPECT_EQ(out.at("be").size(0), 3);
  EXPECT_EQ(s.apply({{"a", torch::ones({1})}}).count("c"), 1u);
}

TEST(Mapper, SequentialMergesGroupsThatShareInputs) {
  // x -> (y, z) by two renames after a concat of x and w: all outputs depend on both.
  ms::Sequential s({std::make_shared<Concat>("x", "w", "xw"), mk_rename("xw", "out")});
  EXPECT_EQ(s.state_dependency_groups(), (ms::StateGroups{{{"w", "x"}, {"out"}}}));
}

TEST(Mapper, SequentialRejectsEmptyList) {
  EXPECT_THAT([] { ms::Sequential({}); },
              ::testing::ThrowsMessage<ms::MapperError>(HasSubstr("the mapper list is empty")));
}

TEST(Mapper, SequentialPassThroughCollisionIsAnError) {
  // Stage 1 outputs y which stage 2 neither reads nor may pass: stage 2 also writes y.
  EXPECT_THAT([] { ms::Sequential({mk_rename("a", "y"), mk_rename("b", "y")}); },
              ::testing::ThrowsMessage<ms::MapperError>(HasSubstr("output key 'y' is written by two mappers")));
}

TEST(Mapper, IdentityMapperFromModuleCoversEveryKey) {
  Tiny tiny;
  auto mapper = ms::identity_mapper_from_module(*tiny);
  ms::StateGroups expected;
  for (const char* k : {"fc.weight", "fc.bias", "norm.weight", "norm.bias"}) expected.insert({{k}, {k}});
  EXPECT_EQ(mapper->state_dependency_groups(), expected);
}

TEST(Load, LoadsThroughIdentity) {
  Tiny tiny;
  auto report = ms::load_state_dict(*tiny, tiny_checkpoint(0.25f));
  EXPECT_TRUE(report.ok()) << report.to_string();
  EXPECT_EQ(report.loaded_keys.size(), 4u);
  EXPECT_TRUE(torch::equal(tiny->fc->weight, torch::full({2, 3}, 0.25f)));
  EXPECT_TRUE(torch::equal(tiny->norm->bias, torch::full({2}, 0.25f)));
  EXPECT_TRUE(tiny->fc->weight.requires_grad());
}

TEST(Load, LoadsThroughRenames) {
  Tiny tiny;
  ms::StateDict src = tiny_checkpoint(0.5f);
  src["linear.weight"] = src.at("fc.weight");
  src.erase("fc.weight");
  ms::Parallel mapper({mk_rename("linear.weight", "fc.weight"), mk_identity("fc.bias"), mk_identity("norm.weight"),
                       mk_identity("norm.bias")});
  EXPECT_TRUE(ms::load_state_dict(*tiny, src, mapper).ok());
  EXPECT_TRUE(torch::equal(tiny->fc->weight, torch::full({2, 3}, 0.5f)));
}

TEST(Load, StrictFailureReportsEverythingAndWritesNothing) {
  Tiny tiny;
  const auto before = tiny->fc->bias.clone();
  ms::StateDict src = tiny_checkpoint(1.0f);
  src.erase("norm.bias");                          // missing
  src["extra.weight"] = torch::ones({1});          // unexpected
  src["fc.weight"] = torch::ones({3, 2});          // wrong shape
  src["norm.weight"] = torch::ones({2}, torch::kDouble);  // wrong dtype
  try {
    ms::load_state_dict(*tiny, src);
    FAIL() << "expected StateLoadError";
  } catch (const ms::StateLoadError& e) {
    const std::string msg = e.what();
    EXPECT_THAT(msg, HasSubstr("nothing was loaded"));
    EXPECT_THAT(msg, HasSubstr("model keys no source provides (1): norm.bias"));
    EXPECT_THAT(msg, HasSubstr("keys the mapper needs that the source lacks (1): norm.bias"));
    EXPECT_THAT(msg, HasSubstr("source keys no mapper group reads (1): extra.weight"));
    EXPECT_THAT(msg, HasSubstr("fc.weight: model [2, 3] Float, source [3, 2] Float"));
    EXPECT_THAT(msg, HasSubstr("norm.weight: model [2] Float, source [2] Double"));
    EXPECT_EQ(e.report().mismatched_keys.size(), 2u);
  }
  EXPECT_TRUE(torch::equal(tiny->fc->bias, before)) << "a failed strict load must not write";
}

TEST(Load, NonStrictLoadsWhatFits) {
  Tiny tiny;
  ms::StateDict src = tiny_checkpoint(2.0f);
  src.erase("norm.bias");
  auto report = ms::load_state_dict(*tiny, src, ms::LoadOptions{/*strict=*/false});
  EXPECT_FALSE(report.ok());
  EXPECT_EQ(report.missing_keys, std::vector<std::string>{"norm.bias"});
  EXPECT_TRUE(torch::equal(tiny->fc->bias, torch::full({2}, 2.0f)));
}

TEST(Load, MapperOutputTheModelLacksIsReported) {
  Tiny tiny;
  ms::StateDict src = tiny_checkpoint(1.0f);
  ms::Parallel mapper({mk_identity("fc.weight"), mk_identity("fc.bias"), mk_identity("norm.weight"),
                       mk_rename("norm.bias", "norm.shift")});
  auto report = ms::load_state_dict(*tiny, src, mapper, ms::LoadOptions{false});
  EXPECT_EQ(report.unknown_output_keys, std::vector<std::string>{"norm.shift"});
  EXPECT_EQ(report.missing_keys, std::vector<std::string>{"norm.bias"});
}

TEST(Load, InconsistentMapperIsAnError) {
  class Liar final : public ms::ModelStateMapper {
   public:
    ms::StateGroups state_dependency_groups() const override { return {{{"fc.weight"}, {"fc.weight"}}}; }
    ms::StateDict apply(ms::StateDict) const override { return {{"other", torch::ones({1})}}; }
  };
  Tiny tiny;
  EXPECT_THAT([&] { ms::load_state_dict(*tiny, tiny_checkpoint(1.0f), Liar()); },
              ::testing::ThrowsMessage<ms::MapperError>(
                  HasSubstr("declared group {fc.weight} -> {fc.weight} but its apply() returned {other}")));
}
