#pragma once

// The checks behind every in-model merge (PEFT's `safe_merge`): an adapter
// holding NaN or Inf, or a merge that overflows the base weight, is refused
// before any weight is changed.

#include <d9d/peft/adapters.h>

#include <string>
#include <vector>

namespace d9d::peft::detail {

/// `PeftError` if adapter `name` of `entry` holds NaN or Inf, naming the layer
/// and the tensor; `what` starts the message (`merge`).
void refuse_non_finite_adapter(const AdapterLayerEntry& entry, const std::string& name, const std::string& what);

/// Merges `names` (in order) into one layer aside, to see whether the merge
/// makes a finite value of the layer non-finite (an overflow), then puts the
/// layer back exactly: every tensor is restored from a copy, so the unmerge's
/// rounding does not remain. `PeftError` naming the layer and the tensor if
/// it overflows. Costs one copy of the layer's tensors.
void check_merge_stays_finite(const AdapterLayerEntry& entry, const std::vector<std::string>& names,
                              const std::string& what);

}  // namespace d9d::peft::detail
