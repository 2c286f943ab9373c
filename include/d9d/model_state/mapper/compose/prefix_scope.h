#pragma once

#include <d9d/model_state/mapper/mapper.h>

namespace d9d::model_state {

/// Runs a mapper written for bare keys on keys under a prefix: the child's
/// inputs are read under `source_prefix` and its outputs written under
/// `target_prefix`. Prefixes are used verbatim, so include the trailing dot.
///
/// ```
/// auto m = std::make_shared<d9d::model_state::PrefixScope>(layer_mapper, "layers.0.", "layers.0.");
/// ```
class PrefixScope final : public ModelStateMapper {
 public:
  explicit PrefixScope(MapperPtr mapper, std::string source_prefix = "", std::string target_prefix = "");
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  MapperPtr mapper_;
  std::string source_prefix_;
  std::string target_prefix_;
  StateGroups groups_;
};

}  // namespace d9d::model_state
