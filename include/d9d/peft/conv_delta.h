#pragma once

// What the methods whose Conv2d layers add `conv2d(x, ΔW)` share (LoHa, LoKr,
// as PEFT's LyCORIS layers).

#include <torch/nn/options/conv.h>

#include <string>

namespace d9d::peft {

/// Why `method` cannot adapt Conv2d `name`, or empty: PEFT convolves the
/// input with `ΔW` padding with zeros, so a base with another padding mode
/// would get an adapter term that does not line up with its own, and a merge
/// would change the outputs.
std::string zero_padded_delta_refusal(const std::string& method, const std::string& name,
                                      const torch::nn::Conv2dOptions& options);

}  // namespace d9d::peft
