#pragma once

#include <d9d/model_state/mapper/mapper.h>

#include <cstdint>
#include <vector>

namespace d9d::model_state {

/// Stacks several tensors, in the order of `sources`, into one along a new
/// dimension `dim`.
///
/// ```
/// auto m = std::make_shared<d9d::model_state::StackTensors>(
///     std::vector<std::string>{"experts.0.w", "experts.1.w"}, "experts.w", 0);
/// ```
class StackTensors final : public ModelStateMapper {
 public:
  StackTensors(std::vector<std::string> sources, std::string target, int64_t dim);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  std::vector<std::string> sources_;
  std::string target_;
  int64_t dim_;
};

/// Splits one tensor along `dim` into its slices, one per target in order; the
/// size of `dim` must equal the number of targets. The inverse of `StackTensors`.
///
/// ```
/// auto m = std::make_shared<d9d::model_state::UnstackTensors>(
///     "experts.w", std::vector<std::string>{"experts.0.w", "experts.1.w"}, 0);
/// ```
class UnstackTensors final : public ModelStateMapper {
 public:
  UnstackTensors(std::string source, std::vector<std::string> targets, int64_t dim);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  std::string source_;
  std::vector<std::string> targets_;
  int64_t dim_;
};

/// Splits one tensor along `dim` into as many chunks as there are targets
/// (`at::chunk`), one per target in order.
///
/// ```
/// auto m = std::make_shared<d9d::model_state::ChunkTensors>(
///     "qkv.weight", std::vector<std::string>{"q.weight", "k.weight", "v.weight"}, 0);
/// ```
class ChunkTensors final : public ModelStateMapper {
 public:
  ChunkTensors(std::string source, std::vector<std::string> targets, int64_t dim);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  std::string source_;
  std::vector<std::string> targets_;
  int64_t dim_;
};

/// Concatenates several tensors, in the order of `sources`, along the existing
/// dimension `dim`. The inverse of `ChunkTensors`.
///
/// ```
/// auto m = std::make_shared<d9d::model_state::ConcatenateTensors>(
///     std::vector<std::string>{"q.weight", "k.weight", "v.weight"}, "qkv.weight", 0);
/// ```
class ConcatenateTensors final : public ModelStateMapper {
 public:
  ConcatenateTensors(std::vector<std::string> sources, std::string target, int64_t dim);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  std::vector<std::string> sources_;
  std::string target_;
  int64_t dim_;
};

}  // namespace d9d::model_state
