#pragma once

#include <d9d/nn/adaptable.h>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <ostream>
#include <vector>

namespace d9d::nn {

/// Options of `GroupedLinear`: `groups` experts, each a linear map from
/// `in_features` to `out_features` without bias.
///
/// ```
/// d9d::nn::GroupedLinear up(d9d::nn::GroupedLinearOptions(/*groups=*/8, /*in=*/1024, /*out=*/512));
/// ```
struct GroupedLinearOptions {
  GroupedLinearOptions(int64_t groups, int64_t in_features, int64_t out_features)
      : groups_(groups), in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, groups);
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
};

/// Receives the calls made to a `GroupedLinear` while a PEFT wrapper holds it:
/// the grouped counterpart of `LayerOverride`, whose one-input `forward`
/// cannot carry the group sizes. A wrapper of a grouped layer implements both
/// (it is installed through `Adaptable::set_override` as every wrapper is);
/// the layer hands its calls to this one.
class GroupedLayerOverride {
 public:
  virtual ~GroupedLayerOverride() = default;
  virtual at::Tensor forward(const at::Tensor& input, const at::Tensor& group_sizes) = 0;
};

/// The experts of a mixture-of-experts block as one layer: `groups` linear
/// maps applied to consecutive runs of tokens (a grouped GEMM), as d9d's
/// Python `GroupedLinear`.
///
/// `weight` is `[groups, in_features, out_features]` (so the checkpoint key
/// is `x.weight`, laid out as d9d's Python module lays it out: note the
/// `[in, out]` order of each expert, the transpose of `nn.Linear`'s). Each
/// expert starts uniform in `[-1/sqrt(in), 1/sqrt(in)]`, as in d9d.
///
/// `forward(input, group_sizes)`: `input` is `[tokens, in_features]` with the
/// tokens sorted by group, `group_sizes` an int64 `[groups]` tensor (on any
/// device; on the CPU it costs no device synchronisation) of how many tokens
/// each group gets, summing to `tokens`; empty groups are allowed. The result
/// is `[tokens, out_features]`, row `t` being `input[t] @ weight[g]` for the
/// group `g` that row `t` falls in.
///
/// On the CPU it runs one matrix product per non-empty group. With CUDA
/// LibTorch 2.9 or later, a bfloat16 CUDA input whose feature sizes are
/// multiples of 8 runs `at::_grouped_mm` (one kernel for all groups).
///
/// Like `d9d::nn::Linear`, a PEFT wrapper (LoRA) can take over its calls from
/// any holder.
///
/// ```
/// struct ExpertsImpl : torch::nn::Module {
///   ExpertsImpl(int64_t experts, int64_t d, int64_t f)
///       : up_proj(register_module("up_proj", d9d::nn::GroupedLinear(experts, d, f))) {}
///   torch::Tensor forward(const torch::Tensor& sorted, const torch::Tensor& counts) { return up_proj(sorted, counts); }
///   d9d::nn::GroupedLinear up_proj;
/// };
/// ```
class GroupedLinearImpl : public torch::nn::Cloneable<GroupedLinearImpl>, public Adaptable {
 public:
  GroupedLinearImpl(int64_t groups, int64_t in_features, int64_t out_features)
      : GroupedLinearImpl(GroupedLinearOptions(groups, in_features, out_features)) {}
  /// Throws `d9d::peft::ConfigError` for a negative size.
  explicit GroupedLinearImpl(const GroupedLinearOptions& options);

  void reset() override;
  /// Re-initialises `weight`: uniform in `[-1/sqrt(in), 1/sqrt(in)]`.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  /// The grouped product, or the PEFT wrapper's forward if one holds this layer.
  at::Tensor forward(const at::Tensor& input, const at::Tensor& group_sizes);
  /// The plain grouped product, never redirected. Wrappers call this.
  at::Tensor forward_base(const at::Tensor& input, const at::Tensor& group_sizes) const;

  /// Checks a call's arguments against this layer and returns the group sizes
  /// on the host. `d9d::peft::PeftError` naming the layer and the shapes: an
  /// input that is not `[tokens, in_features]`, of another dtype or device
  /// than the weight; group sizes that are not int64, not one per group,
  /// negative, or do not sum to the number of tokens.
  std::vector<int64_t> check_input(const at::Tensor& input, const at::Tensor& group_sizes) const;

  GroupedLinearOptions options;
  /// `[groups, in_features, out_features]`.
  at::Tensor weight;
};

TORCH_MODULE(GroupedLinear);

/// The grouped product alone: `input` `[tokens, in]` sorted by group,
/// `weight` `[groups, in, out]`, `group_sizes` on the host (checked by the
/// caller: `GroupedLinearImpl::check_input`). Records autograd as usual.
at::Tensor grouped_linear(const at::Tensor& input, const at::Tensor& weight, c10::ArrayRef<int64_t> group_sizes);

namespace detail {
/// For tests on machines without a GPU: lets CPU bfloat16 calls take the
/// `at::_grouped_mm` path (LibTorch 2.9+ has a CPU kernel) so that its use
/// is checked. Returns false where this LibTorch has no `_grouped_mm`.
bool use_grouped_mm_on_cpu(bool on);
}  // namespace detail

}  // namespace d9d::nn
