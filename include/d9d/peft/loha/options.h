#pragma once

#include <d9d/peft/adapter_layer.h>

#include <torch/arg.h>

#include <cstdint>
#include <string>

namespace d9d::peft {

/// The options of one LoHa adapter (low-rank Hadamard product, Hugging Face
/// PEFT's LoHa): `ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r`, on a
/// linear layer or a Conv2d.
///
/// ```
/// auto options = d9d::peft::LoHaParameters().r(4).alpha(8).rank_dropout(0.1);
/// ```
struct LoHaParameters : AdapterOptions {
  /// The rank of each of the two factor products (PEFT's `r`).
  TORCH_ARG(int64_t, r) = 8;
  /// The scale is `alpha / r` (PEFT's `alpha`).
  TORCH_ARG(double, alpha) = 8;
  /// In training, each output row of ΔW is dropped with this probability and
  /// the kept rows are divided by the kept fraction (PEFT's `rank_dropout`).
  TORCH_ARG(double, rank_dropout) = 0.0;
  /// In training, the whole adapter is skipped for a forward call with this
  /// probability (PEFT's `module_dropout`).
  TORCH_ARG(double, module_dropout) = 0.0;
  /// On a Conv2d whose kernel is larger than 1×1: PEFT's `use_effective_conv2d`,
  /// the kernel factored in CP form, `ΔW[o,i,h,w] = Σ t1[p,q,h,w]·w1_a[p,o]·w1_b[q,i]`
  /// times the same with `t2`, `w2_a`, `w2_b` (keys `hada_t1`, `hada_t2`).
  /// Otherwise (the default, and always on 1×1 kernels and linear layers) a
  /// Conv2d's ΔW is built flat, `[out, in/groups·kh·kw]`, and reshaped.
  TORCH_ARG(bool, use_effective_conv2d) = false;
  /// PEFT's `init_weights`: `hada_w2_b` starts at zeros so the adapter is a
  /// no-op; false draws every factor (kaiming-uniform), for tests.
  TORCH_ARG(bool, init_weights) = true;

  // TORCH_ARG leaves the struct in a private section.
 public:
  /// Throws `ConfigError` naming `path`-relative fields.
  void validate(const std::string& path = "") const;
};

}  // namespace d9d::peft
