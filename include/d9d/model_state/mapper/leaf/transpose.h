#pragma once

#include <d9d/model_state/mapper/mapper.h>

#include <cstdint>

namespace d9d::model_state {

/// Swaps two dimensions of one tensor in place of its key; the result is contiguous.
///
/// ```
/// auto m = std::make_shared<d9d::model_state::Transpose>("lm_head.weight", 0, 1);
/// ```
class Transpose final : public ModelStateMapper {
 public:
  Transpose(std::string name, int64_t dim0, int64_t dim1);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  std::string name_;
  int64_t dim0_;
  int64_t dim1_;
};

}  // namespace d9d::model_state
