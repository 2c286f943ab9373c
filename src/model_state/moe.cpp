#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <d9d/model_state/mapper/adapters.h>
#include <d9d/model_state/mapper/compose/parallel.h>
#include <d9d/model_state/mapper/compose/sequential.h>
#include <d9d/model_state/mapper/leaf/identity.h>
#include <d9d/model_state/mapper/leaf/rename.h>
#include <d9d/model_state/mapper/leaf/stack.h>
#include <d9d/model_state/mapper/leaf/transpose.h>
#include <d9d/model_state/mapper/moe.h>
#include <fmt/format.h>

#include <functional>
#include <utility>

#include "mapper_checks.h"

namespace d9d::model_state {

std::string to_string(MoeLayout layout) {
  switch (layout) {
    case MoeLayout::per_expert:
      return "per_expert";
    case MoeLayout::fused:
      return "fused";
    case MoeLayout::fused_in_out:
      return "fused_in_out";
    case MoeLayout::fused_in_out_interleaved:
      return "fused_in_out_interleaved";
  }
  return "unknown";
}

MoeExperts::MoeExperts(std::string prefix, int64_t num_experts, MoeLayout layout)
    : prefix_(std::move(prefix)), num_experts_(num_experts), layout_(layout) {}

namespace {

std::string describe(const std::string& key, const at::Tensor& t) {
  std::string shape = "[";
  for (int64_t i = 0; i < t.dim(); ++i) shape += (i ? ", " : "") + std::to_string(t.size(i));
  shape += "]";
  return fmt::format("'{}' (shape {}, {})", key, shape, c10::toString(t.scalar_type()));
}

/// Checks one group's tensors before its leaves move them, so that a wrong
/// file is reported by the keys of the file rather than by an ATen message.
using Check = std::function<void(const StateDict&)>;

/// A group built from the mapper family's leaves, with a check in front.
class CheckedGroup final : public ModelStateMapper {
 public:
  CheckedGroup(const char* who, MapperPtr inner, Check check)
      : who_(who), inner_(std::move(inner)), check_(std::move(check)), groups_(inner_->state_dependency_groups()) {
    if (groups_.size() != 1) throw MapperError(fmt::format("{}: internal: expected one group", who_));
  }
  StateGroups state_dependency_groups() const override { return groups_; }
  StateDict apply(StateDict group) const override {
    detail::expect_keys(who_, group, groups_.begin()->inputs);
    check_(group);
    return inner_->apply(std::move(group));
  }

 private:
  const char* who_;
  MapperPtr inner_;
  Check check_;
  StateGroups groups_;
};

/// GPT-OSS's interleaved columns: `[E, d, 2*ff]` with gate = `[..., 0::2]`,
/// up = `[..., 1::2]`, to and from two `[E, d, ff]` tensors. No leaf of the
/// family does a strided split, so it is a small mapper of its own here.
class Interleave final : public ModelStateMapper {
 public:
  Interleave(std::string fused, std::string gate, std::string up, bool split)
      : fused_(std::move(fused)), gate_(std::move(gate)), up_(std::move(up)), split_(split) {}
  StateGroups state_dependency_groups() const override {
    return split_ ? StateGroups{StateGroup{{fused_}, {gate_, up_}}} : StateGroups{StateGroup{{gate_, up_}, {fused_}}};
  }
  StateDict apply(StateDict group) const override {
    if (split_) {
      const at::Tensor& t = group.at(fused_);
      const int64_t last = t.dim() - 1;
      return {{gate_, t.slice(last, 0, c10::nullopt, 2).contiguous()},
              {up_, t.slice(last, 1, c10::nullopt, 2).contiguous()}};
    }
    const at::Tensor& g = group.at(gate_);
    const at::Tensor& u = group.at(up_);
    auto sizes = g.sizes().vec();
    sizes.back() *= 2;
    return {{fused_, at::stack({g, u}, -1).reshape(sizes).contiguous()}};
  }

 private:
  std::string fused_, gate_, up_;
  bool split_;
};

template <class M, class... Args>
MapperPtr make(Args&&... args) {
  return std::make_shared<M>(std::forward<Args>(args)...);
}

MapperPtr seq(std::vector<MapperPtr> stages) { return make<Sequential>(std::move(stages)); }
MapperPtr par(std::vector<MapperPtr> parts) { return make<Parallel>(std::move(parts)); }

/// Names and checks of one layer, shared by the load and save directions.
struct Layer {
  explicit Layer(const MoeExperts& e, const char* who) : spec(e), who(who) {
    if (e.prefix().empty()) throw MapperError(fmt::format("{}: the experts' prefix is empty", who));
    if (e.num_experts() < 1) {
      throw MapperError(
          fmt::format("{}: {}: num_experts is {}; a layer has at least one expert", who, e.prefix(), e.num_experts()));
    }
    const bool fused = e.layout() != MoeLayout::per_expert;
    distinct("checkpoint", fused ? std::vector<std::string>{e.gate_up(), e.down()}
                                 : std::vector<std::string>{e.gate(), e.up(), e.down()});
    distinct("model", {e.model_gate(), e.model_up(), e.model_down()});
  }

  void distinct(const char* side, const std::vector<std::string>& names) const {
    for (size_t i = 0; i < names.size(); ++i) {
      if (names[i].empty())
        throw MapperError(fmt::format("{}: {}: a {} projection name is empty", who, spec.prefix(), side));
      for (size_t j = 0; j < i; ++j) {
        if (names[i] == names[j]) {
          throw MapperError(
              fmt::format("{}: {}: two {} projections are both named '{}'", who, spec.prefix(), side, names[i]));
        }
      }
    }
  }

  std::string expert_key(int64_t e, const std::string& proj) const {
    return fmt::format("{}.{}.{}.weight", spec.prefix(), e, proj);
  }
  std::vector<std::string> expert_keys(const std::string& proj) const {
    std::vector<std::string> keys;
    for (int64_t e = 0; e < spec.num_experts(); ++e) keys.push_back(expert_key(e, proj));
    return keys;
  }
  std::string fused_key(const std::string& proj) const { return spec.prefix() + "." + proj; }
  std::string model_key(const std::string& proj) const {
    return spec.model_prefix_or_prefix() + "." + proj + ".weight";
  }

  /// Every expert tensor is 2-D with expert 0's shape and dtype.
  Check same_experts(std::vector<std::string> keys) const {
    return [keys = std::move(keys), who = who](const StateDict& group) {
      const at::Tensor& first = group.at(keys[0]);
      for (const auto& key : keys) {
        const at::Tensor& t = group.at(key);
        if (t.dim() != 2) {
          throw MapperError(fmt::format("{}: {} is not 2-D; a per-expert weight is [out, in]", who, describe(key, t)));
        }
        if (t.sizes() != first.sizes() || t.scalar_type() != first.scalar_type()) {
          throw MapperError(fmt::format("{}: {} differs from {}; every expert of a layer has the same shape and dtype",
                                        who, describe(key, t), describe(keys[0], first)));
        }
      }
    };
  }

  /// Every tensor is `[num_experts, ., .]`, all of one shape and dtype, and its
  /// dimension `even_dim` (when set: gate and up side by side) of even size.
  Check grouped(std::vector<std::string> keys, int64_t even_dim = -1) const {
    return [keys = std::move(keys), even_dim, who = who, e = spec.num_experts()](const StateDict& group) {
      const at::Tensor& first = group.at(keys[0]);
      for (const auto& key : keys) {
        const at::Tensor& t = group.at(key);
        if (t.dim() != 3 || t.size(0) != e) {
          throw MapperError(fmt::format("{}: {} is not [num_experts = {}, ., .]; check num_experts and the layout", who,
                                        describe(key, t), e));
        }
        if (even_dim >= 0 && t.size(even_dim) % 2 != 0) {
          throw MapperError(
              fmt::format("{}: {} holds gate and up, so its dim {} must be even", who, describe(key, t), even_dim));
        }
        if (t.sizes() != first.sizes() || t.scalar_type() != first.scalar_type()) {
          throw MapperError(fmt::format("{}: {} differs from {}; gate and up have the same shape and dtype", who,
                                        describe(key, t), describe(keys[0], first)));
        }
      }
    };
  }

  MapperPtr checked(MapperPtr inner, Check check) const {
    return make<CheckedGroup>(who, std::move(inner), std::move(check));
  }

  const MoeExperts& spec;
  const char* who;
};

}  // namespace

MapperPtr moe_experts_load_mapper(const MoeExperts& experts) {
  const Layer l(experts, "moe_experts_load_mapper");
  const auto& s = experts;
  const std::string g = l.model_key(s.model_gate()), u = l.model_key(s.model_up()), d = l.model_key(s.model_down());
  std::vector<MapperPtr> parts;
  if (s.layout() == MoeLayout::per_expert) {
    // [ff, d] per expert (nn.Linear's [out, in]) -> [E, ff, d] -> [E, d, ff].
    for (const auto& [proj, target] : {std::pair{s.gate(), g}, std::pair{s.up(), u}, std::pair{s.down(), d}}) {
      auto keys = l.expert_keys(proj);
      parts.push_back(
          l.checked(seq({make<StackTensors>(keys, target, 0), make<Transpose>(target, 1, 2)}), l.same_experts(keys)));
    }
    return par(std::move(parts));
  }
  const std::string gate_up = l.fused_key(s.gate_up()), down = l.fused_key(s.down());
  switch (s.layout()) {
    case MoeLayout::fused:  // [E, 2*ff, d] rows gate | up; down [E, d, ff]
      parts.push_back(l.checked(seq({make<ChunkTensors>(gate_up, std::vector<std::string>{g, u}, 1),
                                     par({make<Transpose>(g, 1, 2), make<Transpose>(u, 1, 2)})}),
                                l.grouped({gate_up}, 1)));
      parts.push_back(l.checked(seq({make<Rename>(down, d), make<Transpose>(d, 1, 2)}), l.grouped({down})));
      break;
    case MoeLayout::fused_in_out:  // [E, d, 2*ff] columns gate | up; down [E, ff, d]
      parts.push_back(
          l.checked(make<ChunkTensors>(gate_up, std::vector<std::string>{g, u}, 2), l.grouped({gate_up}, 2)));
      parts.push_back(l.checked(make<Rename>(down, d), l.grouped({down})));
      break;
    case MoeLayout::fused_in_out_interleaved:  // [E, d, 2*ff] columns g0 u0 g1 u1 ...; down [E, ff, d]
      parts.push_back(l.checked(make<Interleave>(gate_up, g, u, true), l.grouped({gate_up}, 2)));
      parts.push_back(l.checked(make<Rename>(down, d), l.grouped({down})));
      break;
    case MoeLayout::per_expert:
      break;
  }
  return par(std::move(parts));
}

MapperPtr moe_experts_save_mapper(const MoeExperts& experts) {
  const Layer l(experts, "moe_experts_save_mapper");
  const auto& s = experts;
  const std::string g = l.model_key(s.model_gate()), u = l.model_key(s.model_up()), d = l.model_key(s.model_down());
  std::vector<MapperPtr> parts;
  if (s.layout() == MoeLayout::per_expert) {
    for (const auto& [proj, source] : {std::pair{s.gate(), g}, std::pair{s.up(), u}, std::pair{s.down(), d}}) {
      parts.push_back(
          l.checked(seq({make<Transpose>(source, 1, 2), make<UnstackTensors>(source, l.expert_keys(proj), 0)}),
                    l.grouped({source})));
    }
    return par(std::move(parts));
  }
  const std::string gate_up = l.fused_key(s.gate_up()), down = l.fused_key(s.down());
  switch (s.layout()) {
    case MoeLayout::fused:
      parts.push_back(l.checked(seq({par({make<Transpose>(g, 1, 2), make<Transpose>(u, 1, 2)}),
                                     make<ConcatenateTensors>(std::vector<std::string>{g, u}, gate_up, 1)}),
                                l.grouped({g, u})));
      parts.push_back(l.checked(seq({make<Transpose>(d, 1, 2), make<Rename>(d, down)}), l.grouped({d})));
      break;
    case MoeLayout::fused_in_out:
      parts.push_back(
          l.checked(make<ConcatenateTensors>(std::vector<std::string>{g, u}, gate_up, 2), l.grouped({g, u})));
      parts.push_back(l.checked(make<Rename>(d, down), l.grouped({d})));
      break;
    case MoeLayout::fused_in_out_interleaved:
      parts.push_back(l.checked(make<Interleave>(gate_up, g, u, false), l.grouped({g, u})));
      parts.push_back(l.checked(make<Rename>(d, down), l.grouped({d})));
      break;
    case MoeLayout::per_expert:
      break;
  }
  return par(std::move(parts));
}

namespace {

/// `mappers` beside an `Identity` for every state key of `module` that none of
/// them touches on the model's side (`outputs` when loading, `inputs` when saving).
MapperPtr complete(const torch::nn::Module& module, std::vector<MapperPtr> mappers, bool model_side_is_output,
                   const char* who) {
  const KeySet module_keys = module_state_keys(module);
  KeySet taken;
  for (const auto& mapper : mappers) {
    for (const auto& group : mapper->state_dependency_groups()) {
      for (const auto& key : model_side_is_output ? group.outputs : group.inputs) {
        if (!module_keys.count(key)) {
          throw MapperError(
              fmt::format("{}: the model has no '{}'; check the layer's model_prefix and model_gate/"
                          "model_up/model_down names{}",
                          who, key,
                          model_side_is_output ? " (into a model with PEFT injected, load through "
                                                 "Sequential({moe_experts_load_mapper(...), the "
                                                 "injection's mapper}))"
                                               : ""));
        }
        taken.insert(key);
      }
    }
  }
  for (const auto& key : module_keys) {
    if (!taken.count(key)) mappers.push_back(make<Identity>(key));
  }
  return par(std::move(mappers));
}

}  // namespace

MapperPtr moe_load_mapper(const torch::nn::Module& module, const std::vector<MoeExperts>& layers) {
  std::vector<MapperPtr> mappers;
  for (const auto& layer : layers) mappers.push_back(moe_experts_load_mapper(layer));
  return complete(module, std::move(mappers), true, "moe_load_mapper");
}

MapperPtr moe_save_mapper(const torch::nn::Module& module, const std::vector<MoeExperts>& layers) {
  std::vector<MapperPtr> mappers;
  for (const auto& layer : layers) mappers.push_back(moe_experts_save_mapper(layer));
  return complete(module, std::move(mappers), false, "moe_save_mapper");
}

}  // namespace d9d::model_state
