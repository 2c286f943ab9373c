// The mapper family beyond Rename/Identity: tensor-reshaping leaves,
// SelectChildModules, PrefixScope, Shard and identity_mapper_from_mapper_outputs.
#include <d9d/model_state/mapper/compose/parallel.h>
#include <d9d/model_state/mapper/compose/prefix_scope.h>
#include <d9d/model_state/mapper/compose/sequential.h>
#include <d9d/model_state/mapper/compose/shard.h>
#include <d9d/model_state/mapper/leaf/identity.h>
#include <d9d/model_state/mapper/leaf/rename.h>
#include <d9d/model_state/mapper/leaf/select_child.h>
#include <d9d/model_state/mapper/leaf/squeeze.h>
#include <d9d/model_state/mapper/leaf/stack.h>
#include <d9d/model_state/mapper/leaf/transpose.h>
#include <d9d/model_state/mapper/outputs.h>

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace ms = d9d::model_state;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;
using Names = std::vector<std::string>;

namespace {

/// A float tensor holding 0, 1, 2, ... in the given shape.
at::Tensor iota(std::vector<int64_t> shape) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return at::arange(n, at::kFloat).reshape(shape);
}

/// A float tensor from explicit values, in the given shape.
at::Tensor values(std::vector<float> data, std::vector<int64_t> shape) {
  return at::tensor(data, at::kFloat).reshape(shape);
}

ms::KeySet keys(const ms::StateDict& dict) {
  ms::KeySet out;
  for (const auto& item : dict) out.insert(item.first);
  return out;
}

template <class M, class... Args>
ms::MapperPtr make(Args&&... args) {
  return std::make_shared<M>(std::forward<Args>(args)...);
}

}  // namespace

// ------------------------------------------------------------------ Transpose

TEST(MapperFamily, TransposeDeclaresOneGroupAndTransposesContiguously) {
  ms::Transpose m("w", 0, 1);
  EXPECT_EQ(m.state_dependency_groups(), (ms::StateGroups{{{"w"}, {"w"}}}));
  const auto t = iota({2, 3});
  const auto out = m.apply({{"w", t}});
  ASSERT_EQ(keys(out), (ms::KeySet{"w"}));
  EXPECT_TRUE(at::equal(out.at("w"), values({0, 3, 1, 4, 2, 5}, {3, 2})));
  EXPECT_TRUE(out.at("w").is_contiguous());
}

TEST(MapperFamily, TransposeNegativeDims) {
  const auto t = iota({2, 3, 4});
  const auto out = ms::Transpose("w", -1, -3).apply({{"w", t}});
  EXPECT_TRUE(at::equal(out.at("w"), t.transpose(0, 2)));
  EXPECT_EQ(out.at("w").sizes(), (std::vector<int64_t>{4, 3, 2}));
}

TEST(MapperFamily, TransposeErrorsNameTheKeys) {
  EXPECT_THAT([] { ms::Transpose("", 0, 1); }, ThrowsMessage<ms::MapperError>(HasSubstr("Transpose: name is empty")));
  ms::Transpose m("w", 0, 5);
  EXPECT_THAT([&] { m.apply({{"v", iota({2, 2})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("Transpose: expected a group with keys {w}, got {v}")));
  EXPECT_THAT([&] { m.apply({{"w", iota({2, 2})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("Transpose: cannot transform 'w' (shape [2, 2])")));
}

// ---------------------------------------------------------- Squeeze/Unsqueeze

TEST(MapperFamily, SqueezeOneDimOrAll) {
  ms::Squeeze one("w", 1);
  EXPECT_EQ(one.state_dependency_groups(), (ms::StateGroups{{{"w"}, {"w"}}}));
  const auto t = iota({2, 1, 3, 1});
  EXPECT_EQ(one.apply({{"w", t}}).at("w").sizes(), (std::vector<int64_t>{2, 3, 1}));
  EXPECT_TRUE(at::equal(one.apply({{"w", t}}).at("w"), t.squeeze(1)));

  ms::Squeeze all("w");
  const auto out = all.apply({{"w", t}});
  EXPECT_EQ(out.at("w").sizes(), (std::vector<int64_t>{2, 3}));
  EXPECT_TRUE(at::equal(out.at("w"), iota({2, 3})));
}

TEST(MapperFamily, SqueezeAndUnsqueezeOutputsAreContiguous) {
  // A transposed input is not contiguous; the mapper output must be.
  const auto t = iota({3, 1, 2}).transpose(0, 2);
  ASSERT_FALSE(t.is_contiguous());
  EXPECT_TRUE(ms::Squeeze("w").apply({{"w", t}}).at("w").is_contiguous());
  const auto u = iota({3, 2}).t();
  ASSERT_FALSE(u.is_contiguous());
  const auto out = ms::Unsqueeze("w", 0).apply({{"w", u}}).at("w");
  EXPECT_TRUE(out.is_contiguous());
  EXPECT_TRUE(at::equal(out, u.unsqueeze(0)));
}

TEST(MapperFamily, UnsqueezeInsertsADim) {
  ms::Unsqueeze m("b", -1);
  EXPECT_EQ(m.state_dependency_groups(), (ms::StateGroups{{{"b"}, {"b"}}}));
  const auto out = m.apply({{"b", values({1, 2, 3}, {3})}});
  EXPECT_TRUE(at::equal(out.at("b"), values({1, 2, 3}, {3, 1})));
}

TEST(MapperFamily, SqueezeAndUnsqueezeErrors) {
  EXPECT_THAT([] { ms::Squeeze(""); }, ThrowsMessage<ms::MapperError>(HasSubstr("Squeeze: name is empty")));
  EXPECT_THAT([] { ms::Unsqueeze("", 0); }, ThrowsMessage<ms::MapperError>(HasSubstr("Unsqueeze: name is empty")));
  EXPECT_THAT([] { ms::Squeeze("w").apply({{"w", iota({2})}, {"x", iota({2})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("Squeeze: expected a group with keys {w}, got {w, x}")));
  EXPECT_THAT([] { ms::Squeeze("w", 4).apply({{"w", iota({2, 1})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("Squeeze: cannot transform 'w' (shape [2, 1])")));
  EXPECT_THAT([] { ms::Unsqueeze("w", 3).apply({{"w", iota({2})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("Unsqueeze: cannot transform 'w' (shape [2])")));
  EXPECT_THAT([] { ms::Unsqueeze("w", 0).apply({}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("Unsqueeze: expected a group with keys {w}, got {}")));
}

// --------------------------------------------------------------- StackTensors

TEST(MapperFamily, StackTensorsStacksInSourceOrder) {
  ms::StackTensors m(Names{"e.1", "e.0"}, "e", 0);
  EXPECT_EQ(m.state_dependency_groups(), (ms::StateGroups{{{"e.0", "e.1"}, {"e"}}}));
  const auto a = values({1, 2}, {2});
  const auto b = values({3, 4}, {2});
  const auto out = m.apply({{"e.0", a}, {"e.1", b}});
  ASSERT_EQ(keys(out), (ms::KeySet{"e"}));
  // e.1 comes first because the sources list it first.
  EXPECT_TRUE(at::equal(out.at("e"), values({3, 4, 1, 2}, {2, 2})));
  EXPECT_TRUE(out.at("e").is_contiguous());

  const auto along1 = ms::StackTensors(Names{"e.0", "e.1"}, "e", 1).apply({{"e.0", a}, {"e.1", b}}).at("e");
  EXPECT_TRUE(at::equal(along1, values({1, 3, 2, 4}, {2, 2})));
  EXPECT_TRUE(along1.is_contiguous());
}

TEST(MapperFamily, StackTensorsErrors) {
  EXPECT_THAT([] { ms::StackTensors(Names{}, "e", 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("StackTensors: sources is empty")));
  EXPECT_THAT([] { ms::StackTensors(Names{"a", "b", "a"}, "e", 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("StackTensors: sources [a, b, a] names 'a' more than once")));
  EXPECT_THAT([] { ms::StackTensors(Names{"a", ""}, "e", 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("StackTensors: sources [a, ] holds an empty key")));
  EXPECT_THAT([] { ms::StackTensors(Names{"a"}, "", 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("StackTensors: target is empty")));
  ms::StackTensors m(Names{"a", "b"}, "e", 0);
  EXPECT_THAT([&] { m.apply({{"a", iota({2})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("StackTensors: expected a group with keys {a, b}, got {a}")));
  EXPECT_THAT([&] { m.apply({{"a", iota({2})}, {"b", iota({3})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("StackTensors: cannot transform [a, b]")));
}

// ------------------------------------------------------------- UnstackTensors

TEST(MapperFamily, UnstackTensorsSplitsIntoContiguousSlices) {
  ms::UnstackTensors m("e", Names{"e.0", "e.1", "e.2"}, 1);
  EXPECT_EQ(m.state_dependency_groups(), (ms::StateGroups{{{"e"}, {"e.0", "e.1", "e.2"}}}));
  const auto t = iota({2, 3});
  const auto out = m.apply({{"e", t}});
  ASSERT_EQ(keys(out), (ms::KeySet{"e.0", "e.1", "e.2"}));
  EXPECT_TRUE(at::equal(out.at("e.0"), values({0, 3}, {2})));
  EXPECT_TRUE(at::equal(out.at("e.1"), values({1, 4}, {2})));
  EXPECT_TRUE(at::equal(out.at("e.2"), values({2, 5}, {2})));
  for (const auto& item : out) EXPECT_TRUE(item.second.is_contiguous()) << item.first;
}

TEST(MapperFamily, UnstackTensorsErrors) {
  EXPECT_THAT([] { ms::UnstackTensors("", Names{"a"}, 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("UnstackTensors: source is empty")));
  EXPECT_THAT([] { ms::UnstackTensors("e", Names{}, 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("UnstackTensors: targets is empty")));
  EXPECT_THAT([] { ms::UnstackTensors("e", Names{"x", "x"}, 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("UnstackTensors: targets [x, x] names 'x' more than once")));
  ms::UnstackTensors m("e", Names{"a", "b"}, 0);
  EXPECT_THAT([&] { m.apply({{"e", iota({3, 4})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr(
                  "UnstackTensors: 'e' (shape [3, 4]) has size 3 along dim 0, but 2 targets are given [a, b]")));
  EXPECT_THAT([&] { m.apply({{"a", iota({2})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("UnstackTensors: expected a group with keys {e}, got {a}")));
  EXPECT_THAT([] { ms::UnstackTensors("e", Names{"a", "b"}, 2).apply({{"e", iota({2, 2})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("UnstackTensors: cannot transform 'e' (shape [2, 2])")));
}

TEST(MapperFamily, StackUnstackRoundTrip) {
  const ms::StateDict experts{{"x.0", iota({2, 3})}, {"x.1", iota({2, 3}).add(10)}, {"x.2", iota({2, 3}).mul(-1)}};
  const Names names{"x.0", "x.1", "x.2"};
  for (int64_t dim : {0, 1, 2, -1}) {
    const auto stacked = ms::StackTensors(names, "x", dim).apply(experts);
    const auto back = ms::UnstackTensors("x", names, dim).apply(stacked);
    ASSERT_EQ(keys(back), keys(experts)) << "dim " << dim;
    for (const auto& item : experts) EXPECT_TRUE(at::equal(back.at(item.first), item.second)) << item.first;
  }
}

// ------------------------------------------------------- Chunk/Concatenate

TEST(MapperFamily, ChunkTensorsSplitsIntoEqualContiguousChunks) {
  ms::ChunkTensors m("qkv", Names{"q", "k", "v"}, 1);
  EXPECT_EQ(m.state_dependency_groups(), (ms::StateGroups{{{"qkv"}, {"q", "k", "v"}}}));
  const auto out = m.apply({{"qkv", iota({2, 6})}});
  ASSERT_EQ(keys(out), (ms::KeySet{"q", "k", "v"}));
  EXPECT_TRUE(at::equal(out.at("q"), values({0, 1, 6, 7}, {2, 2})));
  EXPECT_TRUE(at::equal(out.at("k"), values({2, 3, 8, 9}, {2, 2})));
  EXPECT_TRUE(at::equal(out.at("v"), values({4, 5, 10, 11}, {2, 2})));
  for (const auto& item : out) EXPECT_TRUE(item.second.is_contiguous()) << item.first;
}

TEST(MapperFamily, ChunkTensorsUnevenLastChunk) {
  // 5 into 3 chunks: sizes 2, 2, 1 (at::chunk semantics).
  const auto out = ms::ChunkTensors("w", Names{"a", "b", "c"}, 0).apply({{"w", iota({5})}});
  EXPECT_TRUE(at::equal(out.at("a"), values({0, 1}, {2})));
  EXPECT_TRUE(at::equal(out.at("b"), values({2, 3}, {2})));
  EXPECT_TRUE(at::equal(out.at("c"), values({4}, {1})));
}

TEST(MapperFamily, ChunkTensorsErrors) {
  EXPECT_THAT([] { ms::ChunkTensors("", Names{"a"}, 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("ChunkTensors: source is empty")));
  EXPECT_THAT([] { ms::ChunkTensors("w", Names{}, 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("ChunkTensors: targets is empty")));
  EXPECT_THAT([] { ms::ChunkTensors("w", Names{"a", "b", "a"}, 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("ChunkTensors: targets [a, b, a] names 'a' more than once")));
  // 5 into 4: chunks of 2 give only 3 chunks.
  EXPECT_THAT([] { ms::ChunkTensors("w", Names{"a", "b", "c", "d"}, 0).apply({{"w", iota({5})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr(
                  "ChunkTensors: 'w' (shape [5]) splits into 3 chunks along dim 0, not the 4 targets [a, b, c, d]")));
  EXPECT_THAT([] { ms::ChunkTensors("w", Names{"a"}, 0).apply({{"v", iota({5})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("ChunkTensors: expected a group with keys {w}, got {v}")));
}

TEST(MapperFamily, ConcatenateTensorsConcatenatesInSourceOrder) {
  ms::ConcatenateTensors m(Names{"v", "q"}, "qv", 0);
  EXPECT_EQ(m.state_dependency_groups(), (ms::StateGroups{{{"q", "v"}, {"qv"}}}));
  const auto out = m.apply({{"q", values({1, 2}, {1, 2})}, {"v", values({3, 4, 5, 6}, {2, 2})}});
  ASSERT_EQ(keys(out), (ms::KeySet{"qv"}));
  EXPECT_TRUE(at::equal(out.at("qv"), values({3, 4, 5, 6, 1, 2}, {3, 2})));
  EXPECT_TRUE(out.at("qv").is_contiguous());

  const auto along1 =
      ms::ConcatenateTensors(Names{"q", "v"}, "qv", 1).apply({{"q", iota({2, 1})}, {"v", iota({2, 2})}}).at("qv");
  EXPECT_TRUE(at::equal(along1, values({0, 0, 1, 1, 2, 3}, {2, 3})));
  EXPECT_TRUE(along1.is_contiguous());
}

TEST(MapperFamily, ConcatenateTensorsErrors) {
  EXPECT_THAT([] { ms::ConcatenateTensors(Names{}, "t", 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("ConcatenateTensors: sources is empty")));
  EXPECT_THAT([] { ms::ConcatenateTensors(Names{"a", "a"}, "t", 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("ConcatenateTensors: sources [a, a] names 'a' more than once")));
  EXPECT_THAT([] { ms::ConcatenateTensors(Names{"a"}, "", 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("ConcatenateTensors: target is empty")));
  ms::ConcatenateTensors m(Names{"a", "b"}, "t", 0);
  EXPECT_THAT([&] { m.apply({{"a", iota({2})}, {"c", iota({2})}}); },
              ThrowsMessage<ms::MapperError>(
                  HasSubstr("ConcatenateTensors: expected a group with keys {a, b}, got {a, c}")));
  EXPECT_THAT([&] { m.apply({{"a", iota({2, 2})}, {"b", iota({2, 3})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("ConcatenateTensors: cannot transform [a, b]")));
}

TEST(MapperFamily, ChunkConcatenateRoundTrip) {
  const Names parts{"q", "k", "v"};
  const auto fused = iota({6, 9});
  for (int64_t dim : {0, 1}) {
    const auto split = ms::ChunkTensors("qkv", parts, dim).apply({{"qkv", fused}});
    const auto back = ms::ConcatenateTensors(parts, "qkv", dim).apply(split);
    ASSERT_EQ(keys(back), (ms::KeySet{"qkv"}));
    EXPECT_TRUE(at::equal(back.at("qkv"), fused)) << "dim " << dim;
  }
}

// --------------------------------------------------------- SelectChildModules

TEST(MapperFamily, SelectChildModulesStripsTheParent) {
  ms::SelectChildModules m(Names{"fc.weight", "fc.bias"}, "model");
  EXPECT_EQ(m.state_dependency_groups(),
            (ms::StateGroups{{{"model.fc.weight"}, {"fc.weight"}}, {{"model.fc.bias"}, {"fc.bias"}}}));
  const auto t = iota({2});
  const auto out = m.apply({{"model.fc.bias", t}});
  ASSERT_EQ(keys(out), (ms::KeySet{"fc.bias"}));
  EXPECT_TRUE(at::equal(out.at("fc.bias"), t));
}

TEST(MapperFamily, SelectChildModulesErrors) {
  EXPECT_THAT([] { ms::SelectChildModules(Names{}, "model"); },
              ThrowsMessage<ms::MapperError>(HasSubstr("SelectChildModules: base_names is empty")));
  EXPECT_THAT([] { ms::SelectChildModules(Names{"w", "w"}, "model"); },
              ThrowsMessage<ms::MapperError>(HasSubstr("SelectChildModules: base_names [w, w] names 'w' more than once")));
  EXPECT_THAT([] { ms::SelectChildModules(Names{"w"}, ""); },
              ThrowsMessage<ms::MapperError>(HasSubstr("SelectChildModules: parent_name is empty")));
  ms::SelectChildModules m(Names{"w", "b"}, "model");
  EXPECT_THAT([&] { m.apply({{"w", iota({1})}}); },
              ThrowsMessage<ms::MapperError>(
                  HasSubstr("SelectChildModules: expected a group with one key of {model.b, model.w}, got {w}")));
  EXPECT_THAT([&] { m.apply({{"model.w", iota({1})}, {"model.b", iota({1})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("got {model.b, model.w}")));
}

// ----------------------------------------------------------------- PrefixScope

TEST(MapperFamily, PrefixScopePrefixesGroupsAndKeys) {
  auto inner = make<ms::Parallel>(std::vector<ms::MapperPtr>{
      make<ms::Rename>("q.weight", "q.base.weight"),
      make<ms::StackTensors>(Names{"e.0", "e.1"}, "e", 0)});
  ms::PrefixScope m(inner, "model.layers.0.", "layers.0.");
  EXPECT_EQ(m.state_dependency_groups(),
            (ms::StateGroups{{{"model.layers.0.q.weight"}, {"layers.0.q.base.weight"}},
                             {{"model.layers.0.e.0", "model.layers.0.e.1"}, {"layers.0.e"}}}));
  const auto a = values({1, 2}, {2});
  const auto b = values({3, 4}, {2});
  const auto out = m.apply({{"model.layers.0.e.0", a}, {"model.layers.0.e.1", b}});
  ASSERT_EQ(keys(out), (ms::KeySet{"layers.0.e"}));
  EXPECT_TRUE(at::equal(out.at("layers.0.e"), values({1, 2, 3, 4}, {2, 2})));

  // Empty prefixes leave the child as it is; one-sided prefixes work too.
  EXPECT_EQ(ms::PrefixScope(inner).state_dependency_groups(), inner->state_dependency_groups());
  EXPECT_EQ(ms::PrefixScope(make<ms::Identity>("w"), "", "out.").state_dependency_groups(),
            (ms::StateGroups{{{"w"}, {"out.w"}}}));
}

TEST(MapperFamily, PrefixScopeErrors) {
  EXPECT_THAT([] { ms::PrefixScope(nullptr, "a.", "b."); },
              ThrowsMessage<ms::MapperError>(HasSubstr("PrefixScope: the mapper is null")));
  ms::PrefixScope m(make<ms::Identity>("w"), "layers.0.", "layers.1.");
  EXPECT_THAT([&] { m.apply({{"layers.1.w", iota({1})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr(
                  "PrefixScope: key 'layers.1.w' of group {layers.1.w} does not start with the source prefix 'layers.0.'")));
  // The child's own check names the stripped key.
  EXPECT_THAT([&] { m.apply({{"layers.0.v", iota({1})}}); },
              ThrowsMessage<ms::MapperError>(HasSubstr("Identity: expected a group with keys {w}, got {v}")));
}

TEST(MapperFamily, PrefixScopeInsideSequentialWithRename) {
  // Stage 1 drops the "model." wrapper; stage 2 scopes a per-layer rename to layer 0.
  auto seq = ms::Sequential({make<ms::Rename>("model.layers.0.q.weight", "layers.0.q.weight"),
                             make<ms::PrefixScope>(make<ms::Rename>("q.weight", "q.base.weight"), "layers.0.",
                                                   "layers.0.")});
  EXPECT_EQ(seq.state_dependency_groups(),
            (ms::StateGroups{{{"model.layers.0.q.weight"}, {"layers.0.q.base.weight"}}}));
  const auto t = iota({2, 2});
  const auto out = seq.apply({{"model.layers.0.q.weight", t}});
  ASSERT_EQ(keys(out), (ms::KeySet{"layers.0.q.base.weight"}));
  EXPECT_TRUE(at::equal(out.at("layers.0.q.base.weight"), t));
}

// ----------------------------------------------------------------------- Shard

namespace {

/// Five groups whose order by sorted input keys is
/// [a.0, e.1], [a.1], [b], [c], [d].
ms::MapperPtr five_groups() {
  return make<ms::Parallel>(std::vector<ms::MapperPtr>{
      make<ms::Identity>("d"), make<ms::Rename>("c", "c2"), make<ms::Identity>("b"), make<ms::Identity>("a.1"),
      make<ms::StackTensors>(Names{"e.1", "a.0"}, "s", 0)});
}

}  // namespace

TEST(MapperFamily, ShardSplitsSortedGroupsRoundRobin) {
  const auto all = five_groups();
  ASSERT_EQ(all->state_dependency_groups().size(), 5u);
  const ms::StateGroup g0{{"a.0", "e.1"}, {"s"}}, g1{{"a.1"}, {"a.1"}}, g2{{"b"}, {"b"}}, g3{{"c"}, {"c2"}},
      g4{{"d"}, {"d"}};
  ms::Shard s0(all, 2, 0);
  ms::Shard s1(all, 2, 1);
  EXPECT_EQ(s0.state_dependency_groups(), (ms::StateGroups{g0, g2, g4}));
  EXPECT_EQ(s1.state_dependency_groups(), (ms::StateGroups{g1, g3}));

  ms::StateGroups together = s0.state_dependency_groups();
  const auto rest = s1.state_dependency_groups();
  together.insert(rest.begin(), rest.end());
  EXPECT_EQ(together, all->state_dependency_groups());

  EXPECT_EQ(ms::Shard(all, 1, 0).state_dependency_groups(), all->state_dependency_groups());
  EXPECT_TRUE(ms::Shard(all, 7, 6).state_dependency_groups().empty());
}

TEST(MapperFamily, ShardApplyDelegates) {
  ms::Shard s1(five_groups(), 2, 1);
  const auto t = iota({3});
  const auto out = s1.apply({{"c", t}});
  ASSERT_EQ(keys(out), (ms::KeySet{"c2"}));
  EXPECT_TRUE(at::equal(out.at("c2"), t));
}

TEST(MapperFamily, ShardErrors) {
  const auto all = five_groups();
  EXPECT_THAT([&] { ms::Shard(all, 0, 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("Shard: total_shards must be >= 1, got 0")));
  EXPECT_THAT([&] { ms::Shard(all, 2, 2); },
              ThrowsMessage<ms::MapperError>(HasSubstr("Shard: current_shard must be in [0, 2), got 2")));
  EXPECT_THAT([&] { ms::Shard(all, 2, -1); },
              ThrowsMessage<ms::MapperError>(HasSubstr("Shard: current_shard must be in [0, 2), got -1")));
  EXPECT_THAT([] { ms::Shard(nullptr, 1, 0); },
              ThrowsMessage<ms::MapperError>(HasSubstr("Shard: the sub-mapper is null")));
}

// ---------------------------------------------- identity_mapper_from_mapper_outputs

TEST(MapperFamily, IdentityMapperFromMapperOutputs) {
  const auto renames = make<ms::Parallel>(std::vector<ms::MapperPtr>{
      make<ms::Rename>("a", "x"), make<ms::Rename>("b", "y"), make<ms::UnstackTensors>("e", Names{"e.0", "e.1"}, 0)});
  const auto identity = ms::identity_mapper_from_mapper_outputs(*renames);
  EXPECT_EQ(identity->state_dependency_groups(),
            (ms::StateGroups{{{"x"}, {"x"}}, {{"y"}, {"y"}}, {{"e.0"}, {"e.0"}}, {{"e.1"}, {"e.1"}}}));
  const auto t = iota({2});
  const auto out = identity->apply({{"y", t}});
  ASSERT_EQ(keys(out), (ms::KeySet{"y"}));
  EXPECT_TRUE(at::equal(out.at("y"), t));
}
