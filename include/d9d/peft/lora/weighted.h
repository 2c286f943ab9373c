#pragma once

// Combining LoRA adapters into a new one: Hugging Face PEFT's
// `add_weighted_adapter` (PEFT 0.21), in a model and on bare tensors (the
// offline `d9d-peft combine` uses the same arithmetic).
//
// ```
// d9d::peft::hf::load_adapter(*model, "adapters/summarise", "summarise");
// d9d::peft::hf::load_adapter(*model, "adapters/translate", "translate");
// d9d::peft::add_weighted_adapter(*model, {"summarise", "translate"}, {0.7, 0.5}, "both",
//                                 d9d::peft::WeightedAdapterOptions().combination_type("svd").svd_rank(8));
// d9d::peft::set_adapter(*model, "both");  // added inactive, as PEFT does
// ```

#include <d9d/peft/lora/math.h>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <torch/arg.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace torch::nn {
class Module;
}

namespace d9d::peft {

/// How `add_weighted_adapter` combines adapters; PEFT's keyword arguments,
/// spelled as PEFT spells them.
struct WeightedAdapterOptions {
  /// `cat`, `linear`, `svd`, `ties`, `ties_svd`, `dare_linear`, `dare_ties`,
  /// `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune`,
  /// `magnitude_prune_svd`. With a single adapter PEFT uses `linear` whatever
  /// is asked (the name must still be one of these).
  TORCH_ARG(std::string, combination_type) = "svd";
  /// `*svd` types: the new adapter's rank (default: the largest input rank).
  TORCH_ARG(std::optional<int64_t>, svd_rank) = std::nullopt;
  /// `*svd` types: clamps the factors to the [-q, q] where q is this quantile
  /// (in [0, 1]) of their entries; none by default.
  TORCH_ARG(std::optional<double>, svd_clamp) = std::nullopt;
  /// `*svd` types: full or reduced SVD (`torch.linalg.svd`'s `full_matrices`).
  TORCH_ARG(bool, svd_full_matrices) = true;
  /// `*svd` types on CUDA: cuSOLVER's `gesvd`, `gesvdj` or `gesvda`.
  TORCH_ARG(std::optional<std::string>, svd_driver) = std::nullopt;
  /// `ties*`, `dare*`, `magnitude_prune*` (required there): the fraction of
  /// entries kept, in (0, 1]; 1 prunes nothing.
  TORCH_ARG(std::optional<double>, density) = std::nullopt;
  /// `ties*`, `dare_ties*`: how the sign is elected, `total` (sign of the
  /// sum) or `frequency` (the more frequent sign).
  TORCH_ARG(std::string, majority_sign_method) = "total";
  /// `dare*`: the generator the random masks are drawn from
  /// (`torch.bernoulli`); undefined (default) draws from the default
  /// generator, as PEFT does, so `torch::manual_seed` fixes them.
  TORCH_ARG(at::Generator, generator);

 public:  // TORCH_ARG leaves the section private
  /// `ConfigError` naming the field (`WeightedAdapterOptions.density: ...`)
  /// unless the options are usable for `adapter_count` adapters.
  void validate(size_t adapter_count) const;
};

/// Adds LoRA adapter `adapter_name` to every LoRA layer holding at least one
/// of `adapters`: the weighted combination of them that
/// `options.combination_type` names, computed as PEFT's
/// `add_weighted_adapter` does. The new adapter is inactive and frozen, as in
/// PEFT; `set_adapter` activates it, and it trains, saves
/// (`hf::save_adapter`) and merges as any other.
///
/// Its rank follows PEFT: the inputs' common rank (`linear`, `ties`,
/// `dare_*`, `magnitude_prune`: they must agree), their sum (`cat`, zero-padded
/// on layers that lack an input), or `svd_rank` / the largest rank (`*svd`);
/// `alpha` equals the rank, and dropout and rsLoRA are the first adapter's.
/// (PEFT copies rsLoRA from the first adapter, so when that one uses rsLoRA
/// the new adapter's scale is `sqrt(r)`, not 1; this does the same.)
///
/// Everything is checked before the model changes; errors (`PeftError`,
/// `ConfigError` for the options) name the adapter, layer or field: an
/// unknown adapter (the known ones are listed), a taken or unusable name
/// (where PEFT silently does nothing), a weight count that is not the adapter
/// count, a non-finite weight, differing ranks where the type needs one
/// rank, DoRA adapters (PEFT would combine their directions and drop the
/// magnitudes), adapters of other methods, NaN or Inf in an input's weights.
void add_weighted_adapter(torch::nn::Module& model, const std::vector<std::string>& adapters,
                          const std::vector<double>& weights, const std::string& adapter_name,
                          const WeightedAdapterOptions& options = {});

namespace lora {

/// One input adapter of one layer: `a` `[r, in]` (`lora_embedding_A` `[r, V]`),
/// `b` `[out, r]` (`lora_embedding_B` `[d, r]`), and its scale.
struct WeightedInput {
  at::Tensor a;
  at::Tensor b;
  double scale = 1.0;
  double weight = 1.0;
};

/// The new adapter's combination type and rank, by PEFT's rules, from the
/// ranks of the input adapters (each adapter's largest rank, as PEFT takes
/// `max(r, *rank_pattern.values())`). Validates `options` too. `what` starts
/// the messages.
struct WeightedPlan {
  std::string combination_type;  ///< `linear` when there is one adapter
  int64_t rank = 0;
};
WeightedPlan plan_weighted(const std::vector<std::string>& adapters, const std::vector<int64_t>& ranks,
                           const WeightedAdapterOptions& options, const std::string& what);

/// The new adapter's `(A, B)` on one layer from the inputs that layer holds
/// (in the order of the adapter list), for the planned type and rank: PEFT's
/// per-layer arithmetic (`cat`, `_generalized_task_arithmetic_weighted_adapter`,
/// `_svd_generalized_task_arithmetic_weighted_adapter`). The layout is the
/// inputs' (`B @ A` is `[out, in]` for a linear layer, `[d, V]` for an
/// embedding), the dtype the first input's A's; the factors are computed for
/// a scale of 1 (`alpha = r`). Random masks (`dare*`) are drawn as PEFT draws
/// them, in this order: for the A factors, then the B factors (`*svd`: the
/// deltas, an embedding's as `[V, d]`), one input after the other.
std::pair<at::Tensor, at::Tensor> combine_weighted(const std::vector<WeightedInput>& inputs, const WeightedPlan& plan,
                                                   const WeightedAdapterOptions& options,
                                                   const std::string& layer = "<layer>",
                                                   LayerKind kind = LayerKind::Linear);

}  // namespace lora
}  // namespace d9d::peft
