#pragma once

#include <d9d/model_state/mapper/mapper.h>

#include <vector>

namespace d9d::model_state {

/// Runs mappers one after another; only the first stage's inputs and the last
/// stage's outputs are visible.
///
/// - Gap filling: a key that must pass a stage unchanged to reach a later
///   stage, or the final output, gets an `Identity` in that stage.
/// - Group merging: stage A mapping `x -> y` and stage B mapping `y -> z`
///   report one group `{x} -> {z}`.
class Sequential final : public ModelStateMapper {
 public:
  /// Mappers with no keys are dropped; throws `MapperError` if none is left.
  explicit Sequential(std::vector<MapperPtr> mappers);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  std::vector<MapperPtr> stages_;
  std::vector<StateGroups> stage_groups_;
  StateGroups groups_;
};

}  // namespace d9d::model_state
