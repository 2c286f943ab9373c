#pragma once

#include <d9d/peft/adapter_layer.h>

#include <torch/arg.h>

#include <cstdint>
#include <string>

namespace d9d::peft {

/// The options of one OFT adapter (orthogonal fine-tuning, Hugging Face PEFT
/// 0.21's block-diagonal form): the layer's input is rotated block by block,
/// `y = base(x · R)`, `R = diag(R_1, ..., R_r)`, each `R_i` the Cayley
/// transform of a skew-symmetric block.
///
/// Exactly one of `r` (number of blocks) and `oft_block_size` is non-zero; the
/// other follows from the layer's `in_features`. Where the given one does not
/// divide `in_features`, it is moved to the nearest divisor (PEFT's
/// `adjust_oft_parameters`, with a warning), as PEFT does.
///
/// ```
/// auto options = d9d::peft::OFTParameters().r(0).oft_block_size(4).coft(true);
/// ```
struct OFTParameters : AdapterOptions {
  /// The number of blocks (PEFT's `r`); 0 when `oft_block_size` is given.
  TORCH_ARG(int64_t, r) = 0;
  /// The side of each block (PEFT's `oft_block_size`); 0 when `r` is given.
  TORCH_ARG(int64_t, oft_block_size) = 32;
  /// Constrained OFT: before each use, each block's skew matrix is projected
  /// into the ball of Frobenius radius `eps / sqrt(number of blocks)`.
  TORCH_ARG(bool, coft) = false;
  /// COFT's radius (PEFT's `eps`); no effect without `coft`.
  TORCH_ARG(double, eps) = 6e-5;
  /// One block's parameters shared by every block.
  TORCH_ARG(bool, block_share) = false;
  /// The Cayley transform by a truncated Neumann series (true) or by the exact
  /// inverse (false).
  TORCH_ARG(bool, use_cayley_neumann) = true;
  /// The number of Neumann terms.
  TORCH_ARG(int64_t, num_cayley_neumann_terms) = 5;
  /// PEFT's `module_dropout`: kept and written, but PEFT 0.21's linear layer
  /// never applies it, so it changes nothing here either.
  TORCH_ARG(double, module_dropout) = 0.0;
  /// PEFT's `init_weights`: the skew parameters start at zero, so `R = I` and
  /// the adapter is a no-op; false draws them from N(0, 0.1²), for tests.
  TORCH_ARG(bool, init_weights) = true;

  // TORCH_ARG leaves the struct in a private section.
 public:
  /// Throws `ConfigError` naming `path`-relative fields.
  void validate(const std::string& path = "") const;
};

}  // namespace d9d::peft
