#pragma once

#include <d9d/model_state/mapper/mapper.h>
#include <torch/arg.h>

#include <cstdint>
#include <string>
#include <vector>

namespace torch::nn {
class Module;
}

namespace d9d::model_state {

/// How a checkpoint stores the routed experts of one mixture-of-experts layer
/// (`E` experts, hidden size `d`, expert size `ff`). The model side is always
/// three grouped weights `[E, in, out]`: `gate_proj` and `up_proj` `[E, d, ff]`,
/// `down_proj` `[E, ff, d]`.
///
/// The fused layouts are those of transformers 5.x (checked in 5.24.0):
/// - `fused`: `models/qwen3_moe/modeling_qwen3_moe.py` (`Qwen3MoeExperts`,
///   also Mixtral, Qwen2-MoE, DeepSeek-V2/V3, OLMoE, ...): `gate_up_proj`
///   `[E, 2*ff, d]` used as `F.linear(x, gate_up_proj[e]).chunk(2, dim=-1)`,
///   so each expert is an `nn.Linear` weight `[out, in]` with the gate rows
///   first, then the up rows; `down_proj` `[E, d, ff]`, also `[out, in]`.
///   `conversion_mapping.py` builds it from the per-expert files by stacking
///   the experts (`MergeModulelist(dim=0)`) and concatenating gate and up
///   (`Concatenate(dim=1)`), and reverts that on `save_pretrained`.
/// - `fused_in_out`: `models/llama4/modeling_llama4.py` (`Llama4TextExperts`):
///   `gate_up_proj` `[E, d, 2*ff]` used as `bmm(x, gate_up_proj).chunk(2, -1)`
///   (`[in, out]`, gate columns first), `down_proj` `[E, ff, d]`.
/// - `fused_in_out_interleaved`: `models/gpt_oss/modeling_gpt_oss.py`
///   (`GptOssExperts`): `gate_up_proj` `[E, d, 2*ff]` used as
///   `x @ gate_up_proj[e]` with `gate = [..., ::2]`, `up = [..., 1::2]`
///   (columns interleaved), `down_proj` `[E, ff, d]`. GPT-OSS's
///   `gate_up_proj_bias` and `down_proj_bias` are not mapped here.
enum class MoeLayout {
  /// transformers 4.x and most Hub files: one `nn.Linear` per expert,
  /// `<prefix>.<e>.gate_proj.weight` `[ff, d]`, `up_proj` `[ff, d]`,
  /// `down_proj` `[d, ff]`.
  per_expert,
  /// `<prefix>.gate_up_proj` `[E, 2*ff, d]` (gate, then up), `<prefix>.down_proj` `[E, d, ff]`.
  fused,
  /// `<prefix>.gate_up_proj` `[E, d, 2*ff]` (gate, then up), `<prefix>.down_proj` `[E, ff, d]`.
  fused_in_out,
  /// `<prefix>.gate_up_proj` `[E, d, 2*ff]` (gate and up alternate), `<prefix>.down_proj` `[E, ff, d]`.
  fused_in_out_interleaved,
};

/// "per_expert", "fused", "fused_in_out" or "fused_in_out_interleaved".
std::string to_string(MoeLayout layout);

/// The experts of one MoE layer: where they are in the checkpoint, how they
/// are stored, and where the grouped weights are in the model.
///
/// ```
/// // Mixtral's Hub files into a model with grouped experts under mlp.experts:
/// auto layer0 = d9d::model_state::MoeExperts("model.layers.0.block_sparse_moe.experts", 8,
///                                             d9d::model_state::MoeLayout::per_expert)
///                   .gate("w1").up("w3").down("w2")
///                   .model_prefix("model.layers.0.mlp.experts");
/// ```
struct MoeExperts {
  MoeExperts(std::string prefix, int64_t num_experts, MoeLayout layout);

  /// The experts' module in the checkpoint, without a trailing dot.
  TORCH_ARG(std::string, prefix);
  TORCH_ARG(int64_t, num_experts);
  TORCH_ARG(MoeLayout, layout);
  /// Checkpoint names of the projections: per expert `<prefix>.<e>.<gate>.weight`;
  /// fused `<prefix>.<gate_up>` and `<prefix>.<down>` (no `.weight`).
  TORCH_ARG(std::string, gate) = "gate_proj";
  TORCH_ARG(std::string, up) = "up_proj";
  TORCH_ARG(std::string, down) = "down_proj";
  TORCH_ARG(std::string, gate_up) = "gate_up_proj";
  /// The experts' module in the model; empty: the same as `prefix`.
  TORCH_ARG(std::string, model_prefix);
  /// Model names of the grouped projections: `<model_prefix>.<model_gate>.weight`.
  TORCH_ARG(std::string, model_gate) = "gate_proj";
  TORCH_ARG(std::string, model_up) = "up_proj";
  TORCH_ARG(std::string, model_down) = "down_proj";

 public:  // TORCH_ARG leaves the section private
  /// `model_prefix`, or `prefix` where it is empty.
  const std::string& model_prefix_or_prefix() const { return model_prefix_.empty() ? prefix_ : model_prefix_; }
};

/// Checkpoint keys of one layer to the model's grouped weights: one group per
/// grouped weight (per expert: the `E` expert tensors stacked, then each
/// transposed to `[in, out]`; fused: `gate_up` split into gate and up, and
/// transposed where the layout is `[out, in]`). Only the expert keys: compose it
/// with others (`Parallel`, or `Sequential` before the mapper
/// `inject_peft_and_freeze` returns), or use `moe_load_mapper` for a whole model.
///
/// The data is moved, never computed, so saving back with
/// `moe_experts_save_mapper` gives the same bytes. An expert tensor of another
/// rank, shape or dtype than expert 0's, a fused tensor whose first dimension
/// is not `num_experts`, or a `gate_up` of odd width is a `MapperError` naming
/// the keys; a missing expert is a missing source key of the load.
MapperPtr moe_experts_load_mapper(const MoeExperts& experts);

/// The inverse: the model's grouped weights of one layer to checkpoint keys in
/// `experts.layout()`, for `save_model_state`. With another layout than the
/// one loaded from, this converts between layouts.
MapperPtr moe_experts_save_mapper(const MoeExperts& experts);

/// A complete mapper for `module`: `moe_experts_load_mapper` for every layer in
/// `layers`, an `Identity` for every other state key of `module`.
///
/// ```
/// std::vector<d9d::model_state::MoeExperts> layers;
/// for (int i = 0; i < 2; ++i)
///   layers.emplace_back(fmt::format("model.layers.{}.mlp.experts", i), 8, d9d::model_state::MoeLayout::fused);
/// d9d::model_state::load_model_state("qwen3-moe", *d9d::model_state::moe_load_mapper(*model, layers), *model);
/// ```
MapperPtr moe_load_mapper(const torch::nn::Module& module, const std::vector<MoeExperts>& layers);

/// A complete mapper for `save_model_state(dir, mapper, module)`:
/// `moe_experts_save_mapper` for every layer in `layers`, an `Identity` for
/// every other state key of `module`.
MapperPtr moe_save_mapper(const torch::nn::Module& module, const std::vector<MoeExperts>& layers);

}  // namespace d9d::model_state
