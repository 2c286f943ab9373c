#pragma once

#include <d9d/model_state/mapper/mapper.h>

#include <cstdint>

namespace d9d::model_state {

/// Restricts a mapper to one shard of its groups, so that several processes
/// can each load part of a checkpoint. Groups are ordered by their input keys;
/// shard `current_shard` keeps the groups at positions `i` with
/// `i % total_shards == current_shard`.
///
/// ```
/// auto m = std::make_shared<d9d::model_state::Shard>(mapper, world_size, rank);
/// ```
class Shard final : public ModelStateMapper {
 public:
  Shard(MapperPtr sub_mapper, int64_t total_shards, int64_t current_shard);
  StateGroups state_dependency_groups() const override;
  StateDict apply(StateDict group) const override;

 private:
  MapperPtr sub_mapper_;
  StateGroups groups_;
};

}  // namespace d9d::model_state
