#include <d9d/model_state/mapper/adapters.h>
#include <d9d/model_state/mapper/compose/parallel.h>
#include <d9d/model_state/mapper/compose/sequential.h>
#include <d9d/model_state/mapper/leaf/identity.h>
#include <d9d/model_state/mapper/leaf/rename.h>

#include <torch/nn/module.h>

#include <fmt/format.h>

#include "mapper_checks.h"

#include <numeric>
#include <sstream>

namespace d9d::model_state {

std::string format_keys(const KeySet& keys) {
  std::string out = "{";
  bool first = true;
  for (const auto& key : keys) {
    out += first ? "" : ", ";
    out += key;
    first = false;
  }
  return out + "}";
}

std::string to_string(const StateGroup& group) {
  return format_keys(group.inputs) + " -> " + format_keys(group.outputs);
}

std::ostream& operator<<(std::ostream& stream, const StateGroup& group) { return stream << to_string(group); }

bool is_empty_mapper(const ModelStateMapper& mapper) {
  for (const auto& group : mapper.state_dependency_groups()) {
    if (!group.inputs.empty() || !group.outputs.empty()) return false;
  }
  return true;
}

namespace {

using detail::expect_keys;
using detail::keys_of;

KeySet all_keys(const StateGroups& groups, KeySet StateGroup::*side) {
  KeySet keys;
  for (const auto& group : groups) keys.insert((group.*side).begin(), (group.*side).end());
  return keys;
}

std::vector<MapperPtr> without_empty(std::vector<MapperPtr> mappers) {
  std::vector<MapperPtr> kept;
  for (auto& mapper : mappers) {
    if (!mapper) throw MapperError("mapper list holds a null mapper");
    if (!is_empty_mapper(*mapper)) kept.push_back(std::move(mapper));
  }
  return kept;
}

}  // namespace

// ----------------------------------------------------------------- leaves

Identity::Identity(std::string name) : name_(std::move(name)) {}

StateGroups Identity::state_dependency_groups() const { return {StateGroup{{name_}, {name_}}}; }

StateDict Identity::apply(StateDict group) const {
  expect_keys("Identity", group, {name_});
  return group;
}

Rename::Rename(std::string name_from, std::string name_to)
    : name_from_(std::move(name_from)), name_to_(std::move(name_to)) {}

StateGroups Rename::state_dependency_groups() const { return {StateGroup{{name_from_}, {name_to_}}}; }

StateDict Rename::apply(StateDict group) const {
  expect_keys("Rename", group, {name_from_});
  return {{name_to_, std::move(group.begin()->second)}};
}

// --------------------------------------------------------------- Parallel

Parallel::Parallel(std::vector<MapperPtr> mappers) {
  KeySet seen_inputs;
  KeySet seen_outputs;
  for (auto& mapper : without_empty(std::move(mappers))) {
    for (const auto& group : mapper->state_dependency_groups()) {
      for (const auto& key : group.inputs) {
        if (!seen_inputs.insert(key).second) {
          throw MapperError(fmt::format("Parallel: input key '{}' is read by two mappers (group {}); "
                                        "each key may feed only one mapper",
                                        key, to_string(group)));
        }
      }
      for (const auto& key : group.outputs) {
        if (!seen_outputs.insert(key).second) {
          throw MapperError(fmt::format("Parallel: output key '{}' is written by two mappers (group {}); "
                                        "each key may come from only one mapper",
                                        key, to_string(group)));
        }
      }
      if (!mapper_by_inputs_.emplace(group.inputs, mapper).second) {
        throw MapperError(fmt::format("Parallel: two groups read the same inputs {}", format_keys(group.inputs)));
      }
      groups_.insert(group);
    }
  }
}

StateGroups Parallel::state_dependency_groups() const { return groups_; }

StateDict Parallel::apply(StateDict group) const {
  const KeySet keys = keys_of(group);
  auto it = mapper_by_inputs_.find(keys);
  if (it == mapper_by_inputs_.end()) {
    throw MapperError(fmt::format("Parallel: no mapper declared a group reading exactly {}; apply() takes one "
                                  "declared group at a time",
                                  format_keys(keys)));
  }
  return it->second->apply(std::move(group));
}

// ------------------------------------------------------------- Sequential

namespace {

StateGroups merge_overlapping(const std::vector<StateGroup>& groups) {
  // Union-find: groups that share an input or an output key become one.
  std::vector<size_t> parent(groups.size());
  std::iota(parent.begin(), parent.end(), 0);
  auto find = [&](size_t i) {
    while (parent[i] != i) i = parent[i] = parent[parent[i]];
    return i;
  };
  std::map<std::string, size_t> owner_in, owner_out;
  for (size_t i = 0; i < groups.size(); ++i) {
    for (const auto& key : groups[i].inputs) {
      auto [it, fresh] = owner_in.emplace(key, i);
      if (!fresh) parent[find(i)] = find(it->second);
    }
    for (const auto& key : groups[i].outputs) {
      auto [it, fresh] = owner_out.emplace(key, i);
      if (!fresh) parent[find(i)] = find(it->second);
    }
  }
  std::map<size_t, StateGroup> merged;
  for (size_t i = 0; i < groups.size(); ++i) {
    auto& target = merged[find(i)];
    target.inputs.insert(groups[i].inputs.begin(), groups[i].inputs.end());
    target.outputs.insert(groups[i].outputs.begin(), groups[i].outputs.end());
  }
  StateGroups result;
  for (auto& item : merged) result.insert(std::move(item.second));
  return result;
}

MapperPtr with_pass_through(MapperPtr stage, const KeySet& keys) {
  if (keys.empty()) return stage;
  std::vector<MapperPtr> parts{std::move(stage)};
  for (const auto& key : keys) parts.push_back(std::make_shared<Identity>(key));
  return std::make_shared<Parallel>(std::move(parts));
}

KeySet difference(const KeySet& a, const KeySet& b) {
  KeySet out;
  std::set_difference(a.begin(), a.end(), b.begin(), b.end(), std::inserter(out, out.end()));
  return out;
}

bool intersects(const KeySet& a, const KeySet& b) {
  auto i = a.begin();
  auto j = b.begin();
  while (i != a.end() && j != b.end()) {
    if (*i < *j) ++i;
    else if (*j < *i) ++j;
    else return true;
  }
  return false;
}

}  // namespace

Sequential::Sequential(std::vector<MapperPtr> mappers) : stages_(without_empty(std::move(mappers))) {
  if (stages_.empty()) {
    throw MapperError("Sequential: the mapper list is empty; pass at least one mapper with inputs or outputs");
  }
  const size_t n = stages_.size();
  // Inputs a stage needs that the previous stage does not produce pass
  // through that previous stage (and, transitively, all earlier ones).
  for (size_t i = n - 1; i >= 1; --i) {
    const KeySet needs = all_keys(stages_[i]->state_dependency_groups(), &StateGroup::inputs);
    const KeySet made = all_keys(stages_[i - 1]->state_dependency_groups(), &StateGroup::outputs);
    stages_[i - 1] = with_pass_through(stages_[i - 1], difference(needs, made));
  }
  // Outputs a stage produces that the next stage does not consume pass
  // through the next stage (and on to the end).
  for (size_t i = 0; i + 1 < n; ++i) {
    const KeySet made = all_keys(stages_[i]->state_dependency_groups(), &StateGroup::outputs);
    const KeySet needs = all_keys(stages_[i + 1]->state_dependency_groups(), &StateGroup::inputs);
    stages_[i + 1] = with_pass_through(stages_[i + 1], difference(made, needs));
  }
  for (const auto& stage : stages_) stage_groups_.push_back(stage->state_dependency_groups());

  std::vector<StateGroup> traced;
  for (const auto& last : stage_groups_.back()) {
    KeySet required = last.inputs;
    for (size_t i = n - 1; i-- > 0;) {
      KeySet next;
      for (const auto& group : stage_groups_[i]) {
        if (intersects(group.outputs, required)) next.insert(group.inputs.begin(), group.inputs.end());
      }
      required = std::move(next);
    }
    traced.push_back(StateGroup{std::move(required), last.outputs});
  }
  groups_ = merge_overlapping(traced);
}

StateGroups Sequential::state_dependency_groups() const { return groups_; }

StateDict Sequential::apply(StateDict group) const {
  StateDict current = std::move(group);
  for (size_t i = 0; i < stages_.size(); ++i) {
    StateDict next;
    for (const auto& deps : stage_groups_[i]) {
      StateDict sub;
      bool complete = true;
      for (const auto& key : deps.inputs) {
        auto it = current.find(key);
        if (it == current.end()) {
          complete = false;
          break;
        }
        sub.emplace(key, it->second);
      }
      if (!complete) continue;
      for (auto& item : stages_[i]->apply(std::move(sub))) next.insert_or_assign(item.first, std::move(item.second));
    }
    current = std::move(next);
  }
  return current;
}

// --------------------------------------------------------------- adapters

KeySet module_state_keys(const torch::nn::Module& module) {
  KeySet keys;
  for (const auto& item : module.named_parameters()) keys.insert(item.key());
  for (const auto& item : module.named_buffers()) keys.insert(item.key());
  return keys;
}

StateDict module_state_dict(const torch::nn::Module& module) {
  StateDict dict;
  for (const auto& item : module.named_parameters()) dict.emplace(item.key(), item.value());
  for (const auto& item : module.named_buffers()) dict.emplace(item.key(), item.value());
  return dict;
}

MapperPtr identity_mapper_from_module(const torch::nn::Module& module) {
  std::vector<MapperPtr> parts;
  for (const auto& key : module_state_keys(module)) parts.push_back(std::make_shared<Identity>(key));
  return std::make_shared<Parallel>(std::move(parts));
}

}  // namespace d9d::model_state
