#pragma once

#include <d9d/model_state/mapper/mapper.h>

#include <vector>

namespace d9d::model_state {

/// Lifts keys out of a submodule: `parent_name + "." + name` becomes `name`,
/// one group per base name.
///
/// ```
/// auto m = std::make_shared<d9d::model_state::SelectChildModules>(
///     std::vector<std::string>{"fc.weight", "fc.bias"}, "model");  // model.fc.weight -> fc.weight
/// ```
class SelectChildModules final : public ModelStateMapper {
 public:
  SelectChildModules(std::vector<std::string> base_names, std::string parent_name);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  std::vector<std::string> base_names_;
  std::string prefix_;
};

}  // namespace d9d::model_state
