#include <d9d/model_state/mapper/compose/parallel.h>
#include <d9d/model_state/mapper/compose/prefix_scope.h>
#include <d9d/model_state/mapper/compose/shard.h>
#include <d9d/model_state/mapper/leaf/identity.h>
#include <d9d/model_state/mapper/leaf/select_child.h>
#include <d9d/model_state/mapper/leaf/squeeze.h>
#include <d9d/model_state/mapper/leaf/stack.h>
#include <d9d/model_state/mapper/leaf/transpose.h>
#include <d9d/model_state/mapper/outputs.h>

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <fmt/format.h>

#include "mapper_checks.h"

namespace d9d::model_state {

namespace {

using detail::expect_keys;
using detail::keys_of;

/// Formats a key list in its given order as `[a, b]`.
std::string format_list(const std::vector<std::string>& names) {
  std::string out = "[";
  for (size_t i = 0; i < names.size(); ++i) out += (i ? ", " : "") + names[i];
  return out + "]";
}

void check_name(const char* mapper, const char* what, const std::string& name) {
  if (name.empty()) throw MapperError(fmt::format("{}: {} is empty; pass a state key", mapper, what));
}

void check_names(const char* mapper, const char* what, const std::vector<std::string>& names) {
  if (names.empty()) throw MapperError(fmt::format("{}: {} is empty; pass at least one state key", mapper, what));
  KeySet seen;
  for (const auto& name : names) {
    if (name.empty()) {
      throw MapperError(fmt::format("{}: {} {} holds an empty key", mapper, what, format_list(names)));
    }
    if (!seen.insert(name).second) {
      throw MapperError(fmt::format("{}: {} {} names '{}' more than once; each key may appear only once", mapper,
                                    what, format_list(names), name));
    }
  }
}

KeySet as_set(const std::vector<std::string>& names) { return KeySet(names.begin(), names.end()); }

/// Runs a tensor op, turning an ATen error (a bad dim, mismatched shapes) into
/// a MapperError that names the mapper and the keys it was working on. Running
/// out of memory stays LibTorch's c10::OutOfMemoryError.
template <class Op>
auto guarded(const char* mapper, const std::string& keys, Op op) {
  try {
    return op();
  } catch (const c10::OutOfMemoryError&) {
    throw;  // not a mapping error: the caller may free memory and retry
  } catch (const c10::Error& error) {
    throw MapperError(fmt::format("{}: cannot transform {}: {}", mapper, keys, error.what_without_backtrace()));
  }
}

std::string shape_of(const at::Tensor& tensor) {
  std::string out = "[";
  for (int64_t i = 0; i < tensor.dim(); ++i) out += (i ? ", " : "") + std::to_string(tensor.size(i));
  return out + "]";
}

StateDict zip_outputs(const std::vector<std::string>& targets, const std::vector<at::Tensor>& parts) {
  StateDict out;
  for (size_t i = 0; i < targets.size(); ++i) out.emplace(targets[i], parts[i].contiguous());
  return out;
}

}  // namespace

// -------------------------------------------------------- single-tensor leaves

Transpose::Transpose(std::string name, int64_t dim0, int64_t dim1) : name_(std::move(name)), dim0_(dim0), dim1_(dim1) {
  check_name("Transpose", "name", name_);
}

StateGroups Transpose::state_dependency_groups() const { return {StateGroup{{name_}, {name_}}}; }

StateDict Transpose::apply(StateDict group) const {
  expect_keys("Transpose", group, {name_});
  const at::Tensor& t = group.begin()->second;
  return {{name_, guarded("Transpose", "'" + name_ + "' (shape " + shape_of(t) + ")",
                          [&] { return t.transpose(dim0_, dim1_).contiguous(); })}};
}

Squeeze::Squeeze(std::string name, std::optional<int64_t> dim) : name_(std::move(name)), dim_(dim) {
  check_name("Squeeze", "name", name_);
}

StateGroups Squeeze::state_dependency_groups() const { return {StateGroup{{name_}, {name_}}}; }

StateDict Squeeze::apply(StateDict group) const {
  expect_keys("Squeeze", group, {name_});
  const at::Tensor& t = group.begin()->second;
  return {{name_, guarded("Squeeze", "'" + name_ + "' (shape " + shape_of(t) + ")", [&] {
             return (dim_ ? t.squeeze(*dim_) : t.squeeze()).contiguous();
           })}};
}

Unsqueeze::Unsqueeze(std::string name, int64_t dim) : name_(std::move(name)), dim_(dim) {
  check_name("Unsqueeze", "name", name_);
}

StateGroups Unsqueeze::state_dependency_groups() const { return {StateGroup{{name_}, {name_}}}; }

StateDict Unsqueeze::apply(StateDict group) const {
  expect_keys("Unsqueeze", group, {name_});
  const at::Tensor& t = group.begin()->second;
  return {{name_, guarded("Unsqueeze", "'" + name_ + "' (shape " + shape_of(t) + ")",
                          [&] { return t.unsqueeze(dim_).contiguous(); })}};
}

// ------------------------------------------------------- many-to-one leaves

namespace {

std::vector<at::Tensor> in_order(const std::vector<std::string>& names, const StateDict& group) {
  std::vector<at::Tensor> tensors;
  tensors.reserve(names.size());
  for (const auto& name : names) tensors.push_back(group.at(name));
  return tensors;
}

}  // namespace

StackTensors::StackTensors(std::vector<std::string> sources, std::string target, int64_t dim)
    : sources_(std::move(sources)), target_(std::move(target)), dim_(dim) {
  check_names("StackTensors", "sources", sources_);
  check_name("StackTensors", "target", target_);
}

StateGroups StackTensors::state_dependency_groups() const { return {StateGroup{as_set(sources_), {target_}}}; }

StateDict StackTensors::apply(StateDict group) const {
  expect_keys("StackTensors", group, as_set(sources_));
  const auto tensors = in_order(sources_, group);
  return {{target_, guarded("StackTensors", format_list(sources_),
                            [&] { return at::stack(tensors, dim_).contiguous(); })}};
}

ConcatenateTensors::ConcatenateTensors(std::vector<std::string> sources, std::string target, int64_t dim)
    : sources_(std::move(sources)), target_(std::move(target)), dim_(dim) {
  check_names("ConcatenateTensors", "sources", sources_);
  check_name("ConcatenateTensors", "target", target_);
}

StateGroups ConcatenateTensors::state_dependency_groups() const {
  return {StateGroup{as_set(sources_), {target_}}};
}

StateDict ConcatenateTensors::apply(StateDict group) const {
  expect_keys("ConcatenateTensors", group, as_set(sources_));
  const auto tensors = in_order(sources_, group);
  return {{target_, guarded("ConcatenateTensors", format_list(sources_),
                            [&] { return at::cat(tensors, dim_).contiguous(); })}};
}

// ------------------------------------------------------- one-to-many leaves

UnstackTensors::UnstackTensors(std::string source, std::vector<std::string> targets, int64_t dim)
    : source_(std::move(source)), targets_(std::move(targets)), dim_(dim) {
  check_name("UnstackTensors", "source", source_);
  check_names("UnstackTensors", "targets", targets_);
}

StateGroups UnstackTensors::state_dependency_groups() const { return {StateGroup{{source_}, as_set(targets_)}}; }

StateDict UnstackTensors::apply(StateDict group) const {
  expect_keys("UnstackTensors", group, {source_});
  const at::Tensor& t = group.begin()->second;
  const std::string what = "'" + source_ + "' (shape " + shape_of(t) + ")";
  const auto slices = guarded("UnstackTensors", what, [&] { return t.unbind(dim_); });
  if (slices.size() != targets_.size()) {
    throw MapperError(fmt::format("UnstackTensors: {} has size {} along dim {}, but {} targets are given {}; "
                                  "the size must equal the number of targets",
                                  what, slices.size(), dim_, targets_.size(), format_list(targets_)));
  }
  return zip_outputs(targets_, slices);
}

ChunkTensors::ChunkTensors(std::string source, std::vector<std::string> targets, int64_t dim)
    : source_(std::move(source)), targets_(std::move(targets)), dim_(dim) {
  check_name("ChunkTensors", "source", source_);
  check_names("ChunkTensors", "targets", targets_);
}

StateGroups ChunkTensors::state_dependency_groups() const { return {StateGroup{{source_}, as_set(targets_)}}; }

StateDict ChunkTensors::apply(StateDict group) const {
  expect_keys("ChunkTensors", group, {source_});
  const at::Tensor& t = group.begin()->second;
  const std::string what = "'" + source_ + "' (shape " + shape_of(t) + ")";
  const auto chunks = guarded("ChunkTensors", what,
                              [&] { return at::chunk(t, static_cast<int64_t>(targets_.size()), dim_); });
  // at::chunk returns fewer chunks than asked when the size does not allow
  // that many (e.g. 5 into 4 gives chunks of 2, 2, 1).
  if (chunks.size() != targets_.size()) {
    throw MapperError(fmt::format("ChunkTensors: {} splits into {} chunks along dim {}, not the {} targets {}",
                                  what, chunks.size(), dim_, targets_.size(), format_list(targets_)));
  }
  return zip_outputs(targets_, chunks);
}

// ---------------------------------------------------------- SelectChildModules

SelectChildModules::SelectChildModules(std::vector<std::string> base_names, std::string parent_name)
    : base_names_(std::move(base_names)) {
  check_names("SelectChildModules", "base_names", base_names_);
  check_name("SelectChildModules", "parent_name", parent_name);
  prefix_ = std::move(parent_name) + ".";
}

StateGroups SelectChildModules::state_dependency_groups() const {
  StateGroups groups;
  for (const auto& name : base_names_) groups.insert(StateGroup{{prefix_ + name}, {name}});
  return groups;
}

StateDict SelectChildModules::apply(StateDict group) const {
  const KeySet got = keys_of(group);
  for (const auto& name : base_names_) {
    if (got == KeySet{prefix_ + name}) return {{name, std::move(group.begin()->second)}};
  }
  KeySet expected;
  for (const auto& name : base_names_) expected.insert(prefix_ + name);
  throw MapperError(fmt::format("SelectChildModules: expected a group with one key of {}, got {}",
                                format_keys(expected), format_keys(got)));
}

// ----------------------------------------------------------------- PrefixScope

namespace {

KeySet prefixed(const std::string& prefix, const KeySet& keys) {
  KeySet out;
  for (const auto& key : keys) out.insert(prefix + key);
  return out;
}

}  // namespace

PrefixScope::PrefixScope(MapperPtr mapper, std::string source_prefix, std::string target_prefix)
    : mapper_(std::move(mapper)), source_prefix_(std::move(source_prefix)), target_prefix_(std::move(target_prefix)) {
  if (!mapper_) throw MapperError("PrefixScope: the mapper is null");
  for (const auto& group : mapper_->state_dependency_groups()) {
    groups_.insert(StateGroup{prefixed(source_prefix_, group.inputs), prefixed(target_prefix_, group.outputs)});
  }
}

StateGroups PrefixScope::state_dependency_groups() const { return groups_; }

StateDict PrefixScope::apply(StateDict group) const {
  StateDict inner;
  for (auto& item : group) {
    if (item.first.compare(0, source_prefix_.size(), source_prefix_) != 0) {
      throw MapperError(fmt::format("PrefixScope: key '{}' of group {} does not start with the source prefix '{}'",
                                    item.first, format_keys(keys_of(group)), source_prefix_));
    }
    inner.emplace(item.first.substr(source_prefix_.size()), std::move(item.second));
  }
  StateDict out;
  for (auto& item : mapper_->apply(std::move(inner))) out.emplace(target_prefix_ + item.first, std::move(item.second));
  return out;
}

// ----------------------------------------------------------------------- Shard

Shard::Shard(MapperPtr sub_mapper, int64_t total_shards, int64_t current_shard) : sub_mapper_(std::move(sub_mapper)) {
  if (!sub_mapper_) throw MapperError("Shard: the sub-mapper is null");
  if (total_shards < 1) throw MapperError(fmt::format("Shard: total_shards must be >= 1, got {}", total_shards));
  if (current_shard < 0 || current_shard >= total_shards) {
    throw MapperError(fmt::format("Shard: current_shard must be in [0, {}), got {}", total_shards, current_shard));
  }
  // StateGroups is ordered by the (sorted) input key sets first, which is the
  // order every shard must agree on.
  int64_t index = 0;
  for (const auto& group : sub_mapper_->state_dependency_groups()) {
    if (index++ % total_shards == current_shard) groups_.insert(group);
  }
}

StateGroups Shard::state_dependency_groups() const { return groups_; }

StateDict Shard::apply(StateDict group) const { return sub_mapper_->apply(std::move(group)); }

// ----------------------------------------------------------------- adapters

MapperPtr identity_mapper_from_mapper_outputs(const ModelStateMapper& mapper) {
  std::vector<MapperPtr> parts;
  for (const auto& group : mapper.state_dependency_groups()) {
    for (const auto& key : group.outputs) parts.push_back(std::make_shared<Identity>(key));
  }
  return std::make_shared<Parallel>(std::move(parts));
}

}  // namespace d9d::model_state
