#pragma once

#include <d9d/model_state/mapper/mapper.h>

#include <cstdint>
#include <optional>

namespace d9d::model_state {

/// Removes size-1 dimensions of one tensor: dimension `dim`, or every size-1
/// dimension when `dim` is not given.
///
/// ```
/// auto m = std::make_shared<d9d::model_state::Squeeze>("conv.weight", 2);
/// ```
class Squeeze final : public ModelStateMapper {
 public:
  explicit Squeeze(std::string name, std::optional<int64_t> dim = std::nullopt);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  std::string name_;
  std::optional<int64_t> dim_;
};

/// Inserts a size-1 dimension at `dim` of one tensor.
///
/// ```
/// auto m = std::make_shared<d9d::model_state::Unsqueeze>("conv.weight", 2);
/// ```
class Unsqueeze final : public ModelStateMapper {
 public:
  Unsqueeze(std::string name, int64_t dim);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  std::string name_;
  int64_t dim_;
};

}  // namespace d9d::model_state
