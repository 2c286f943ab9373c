#pragma once

#include <d9d/peft/adapter_layer.h>

#include <torch/arg.h>

#include <cstdint>
#include <string>

namespace d9d::peft {

/// How a new LoKr adapter's factors start (PEFT's `init_weights`).
enum class LoKrInit {
  /// `true` in PEFT (its default): `lokr_w1` (or `lokr_w1_a`) zeros, the rest
  /// kaiming-uniform, so a fresh adapter is a no-op.
  kPeft,
  /// `false` in PEFT: every factor kaiming-uniform (for tests).
  kRandom,
  /// `"lycoris"` in PEFT: `lokr_w2` (or `lokr_w2_b`) zeros, the rest
  /// kaiming-uniform, as the LyCORIS repository starts; also a no-op.
  kLycoris,
};

/// The options of one LoKr adapter (low-rank Kronecker product, Hugging Face
/// PEFT's LoKr): `ΔW = kron(w1, w2) · alpha / r`, with `out = a·b`, `in = c·d`
/// factored by `lokr::factorization`, `w1` `[a, c]` and `w2` `[b, d]` (on a
/// Conv2d `[b, d, kh, kw]`), each stored whole or as a rank-r product (see
/// `lokr::FactorShape`).
///
/// ```
/// auto options = d9d::peft::LoKrParameters().r(4).alpha(8).decompose_both(true);
/// ```
struct LoKrParameters : AdapterOptions {
  /// The rank of the factored parts (PEFT's `r`); it also decides which
  /// factors are factored at all.
  TORCH_ARG(int64_t, r) = 8;
  /// The scale is `alpha / r` (PEFT's `alpha`), whether the factors are whole or factored.
  TORCH_ARG(double, alpha) = 8;
  /// In training, each output row of ΔW is dropped with this probability (PEFT's `rank_dropout`).
  TORCH_ARG(double, rank_dropout) = 0.0;
  /// With rank dropout, divide the kept rows by the kept fraction of that draw
  /// (PEFT's `rank_dropout_scale`).
  TORCH_ARG(bool, rank_dropout_scale) = false;
  /// In training, the whole adapter is skipped for a forward call with this
  /// probability (PEFT's `module_dropout`).
  TORCH_ARG(double, module_dropout) = 0.0;
  /// Store `w1` as `lokr_w1_a @ lokr_w1_b` too, where r is small enough
  /// (PEFT's `decompose_both`).
  TORCH_ARG(bool, decompose_both) = false;
  /// On a Conv2d whose kernel is larger than 1×1 and whose `w2` is factored:
  /// PEFT's `use_effective_conv2d`, `w2` in CP form (`lokr_t2 [r, r, kh, kw]`,
  /// `lokr_w2_a [r, b]`, `lokr_w2_b [r, d]`) instead of flat
  /// (`[b, r] @ [r, d·kh·kw]`). No effect on linear layers.
  TORCH_ARG(bool, use_effective_conv2d) = false;
  /// The Kronecker split of each dimension: -1 near its square root, k > 0
  /// a factor of k where k divides it (PEFT's `decompose_factor`).
  TORCH_ARG(int64_t, decompose_factor) = -1;
  TORCH_ARG(LoKrInit, init_weights) = LoKrInit::kPeft;

  // TORCH_ARG leaves the struct in a private section.
 public:
  /// Throws `ConfigError` naming `path`-relative fields.
  void validate(const std::string& path = "") const;
};

}  // namespace d9d::peft
