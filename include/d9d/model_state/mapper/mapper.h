#pragma once

#include <d9d/error.h>

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <ostream>
#include <set>
#include <string>

namespace d9d::model_state {

/// A flat state dict: qualified key (`layers.0.q_proj.weight`) to tensor.
using StateDict = std::map<std::string, at::Tensor>;
using KeySet = std::set<std::string>;

/// An atomic unit of a state transformation: the complete set of source keys
/// it reads and the complete set of destination keys it writes.
struct StateGroup {
  KeySet inputs;
  KeySet outputs;

  bool operator==(const StateGroup& other) const {
    return inputs == other.inputs && outputs == other.outputs;
  }
  bool operator!=(const StateGroup& other) const { return !(*this == other); }
  bool operator<(const StateGroup& other) const {
    return inputs != other.inputs ? inputs < other.inputs : outputs < other.outputs;
  }
};

using StateGroups = std::set<StateGroup>;

/// Formats a group as `{a, b} -> {c}`.
std::string to_string(const StateGroup& group);
std::ostream& operator<<(std::ostream& stream, const StateGroup& group);
/// Formats a key set as `{a, b}` (for error messages).
std::string format_keys(const KeySet& keys);

/// Raised when mappers are composed inconsistently or applied to the wrong keys.
class MapperError : public d9d::Error {
 public:
  using d9d::Error::Error;
};

/// Turns tensors stored under one naming scheme into another.
///
/// A mapper separates the declaration of a transformation from its execution:
/// `state_dependency_groups()` says which keys it reads and writes, without
/// touching data, so chains can be validated and streamed group by group;
/// `apply(group)` runs it on the tensors of one group.
class ModelStateMapper {
 public:
  virtual ~ModelStateMapper() = default;

  /// The independent groups this mapper handles; pairwise disjoint.
  virtual StateGroups state_dependency_groups() const = 0;

  /// Transforms the tensors of one group. `group` holds exactly the `inputs`
  /// of one of the groups; the result holds exactly its `outputs`.
  virtual StateDict apply(StateDict group) const = 0;
};

using MapperPtr = std::shared_ptr<const ModelStateMapper>;

/// True when the mapper reads and writes no key: every group it declares (if
/// any) has empty inputs and outputs. Compositions drop such mappers.
bool is_empty_mapper(const ModelStateMapper& mapper);

}  // namespace d9d::model_state
