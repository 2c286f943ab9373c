#pragma once

#include <d9d/model_state/mapper/mapper.h>

namespace d9d::model_state {

/// Moves one tensor from key `name_from` to key `name_to`.
///
/// ```
/// auto m = std::make_shared<d9d::model_state::Rename>("fc.weight", "fc.base.weight");
/// ```
class Rename final : public ModelStateMapper {
 public:
  Rename(std::string name_from, std::string name_to);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  std::string name_from_;
  std::string name_to_;
};

}  // namespace d9d::model_state
