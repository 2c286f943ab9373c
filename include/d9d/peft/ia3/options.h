#pragma once

#include <d9d/peft/adapter_layer.h>

#include <torch/arg.h>

namespace d9d::peft {

/// The options of one (IA)³ adapter: a learned vector that rescales a linear
/// layer's output (`ia3_l` `[out, 1]`) or, on a feed-forward layer, its input
/// (`[1, in]`), as Hugging Face PEFT's IA3.
///
/// ```
/// auto options = d9d::peft::IA3Parameters().feedforward(true);
/// ```
struct IA3Parameters : AdapterOptions {
  /// Scale the layer's input (PEFT's `feedforward_modules`) instead of its output.
  TORCH_ARG(bool, feedforward) = false;
  /// Start at ones, so the adapter is a no-op (PEFT's `init_ia3_weights`);
  /// false draws normal(0, 1), for tests.
  TORCH_ARG(bool, init_ones) = true;
};

}  // namespace d9d::peft
