#pragma once

// The arithmetic of merging a LoRA adapter into a weight, written once: the
// in-model merge (`LoRALinearImpl::merge_adapter`) and the offline checkpoint
// merge (`hf::merge_lora_weight`, `d9d-peft merge`) both call these.

#include <ATen/core/Tensor.h>

namespace d9d::peft::lora {

/// The layer type a LoRA adapter sits on; it fixes how `B @ A` lines up with
/// the weight and along which axis DoRA normalises.
enum class LayerKind {
  /// weight `[out, in]`, A `[r, in]`, B `[out, r]`: `delta = B @ A`, DoRA per row.
  Linear,
  /// weight `[V, d]`, A `[r, V]`, B `[d, r]`: `delta = (B @ A)^T`, DoRA per column.
  Embedding,
};

/// `(B @ A) * scale` in `weight`'s shape (transposed for an embedding),
/// computed in float32 (float64 for a float64 weight) whatever the adapter's dtype.
at::Tensor delta_weight(LayerKind kind, const at::Tensor& a, const at::Tensor& b, double scale,
                        const at::Tensor& weight);

/// The DoRA norm of `weight + scale * delta`: per row (linear) or per
/// column (embedding), in float32 (float64 for a float64 weight), formed in
/// PEFT's order of operations so that the rounding is PEFT's.
at::Tensor dora_norm(LayerKind kind, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b,
                     double scale);

/// The merged weight, in `weight`'s dtype: `W + s * delta`, or with a DoRA
/// `magnitude` (defined) `m / ||W + s * delta|| * (W + s * delta)`. When
/// `norm_out` is given it receives the DoRA norm (for unmerging).
at::Tensor merged_weight(LayerKind kind, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b,
                         double scale, const at::Tensor& magnitude = {}, at::Tensor* norm_out = nullptr);

/// `weight` becomes `merged_weight(...)`, in place: one `addmm_` (linear)
/// or `add_` (embedding) where the weight is float32/float64 and there is no
/// DoRA, so merging a large layer allocates nothing.
void merge_in_place(LayerKind kind, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale,
                    const at::Tensor& magnitude = {}, at::Tensor* norm_out = nullptr);

/// The inverse of `merged_weight`: the weight before the merge, given the
/// DoRA norm the merge used (undefined without DoRA).
at::Tensor unmerged_weight(LayerKind kind, const at::Tensor& merged, const at::Tensor& a, const at::Tensor& b,
                           double scale, const at::Tensor& magnitude = {}, const at::Tensor& norm = {});

/// `weight` becomes `unmerged_weight(...)`, in place as `merge_in_place`.
void unmerge_in_place(LayerKind kind, const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double scale,
                      const at::Tensor& magnitude = {}, const at::Tensor& norm = {});

}  // namespace d9d::peft::lora
