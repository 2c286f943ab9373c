#pragma once

#include <d9d/model_state/mapper/mapper.h>

namespace d9d::model_state {

/// Passes one tensor through unchanged.
class Identity final : public ModelStateMapper {
 public:
  explicit Identity(std::string name);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  std::string name_;
};

}  // namespace d9d::model_state
