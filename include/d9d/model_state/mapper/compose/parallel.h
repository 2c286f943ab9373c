#pragma once

#include <d9d/model_state/mapper/mapper.h>

#include <vector>

namespace d9d::model_state {

/// Runs mappers side by side. No two of them may read the same key or write
/// the same key: a collision is a `MapperError` naming the keys. `apply`
/// routes each group to the mapper that declared it.
class Parallel final : public ModelStateMapper {
 public:
  explicit Parallel(std::vector<MapperPtr> mappers);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  StateGroups groups_;
  std::map<KeySet, MapperPtr> mapper_by_inputs_;
};

}  // namespace d9d::model_state
