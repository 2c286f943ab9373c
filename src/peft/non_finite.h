#pragma once

// The one count of NaN and Inf values behind every safe-merge check (in-model
// and offline, every method).

#include <ATen/Functions.h>

#include <cstdint>

namespace d9d::peft::detail {

/// How many elements of `t` are NaN or +/-Inf.
inline int64_t count_non_finite(const at::Tensor& t) { return t.numel() - at::isfinite(t).sum().item<int64_t>(); }

}  // namespace d9d::peft::detail
