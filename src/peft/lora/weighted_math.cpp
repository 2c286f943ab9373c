// The arithmetic of combining LoRA adapters (PEFT's add_weighted_adapter and
// peft/utils/merge_utils.py), on bare tensors: the in-model combination and
// `d9d-peft combine` both call it.
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/weighted.h>

#include <ATen/ATen.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>

namespace d9d::peft {

namespace {

const std::vector<std::string> kTypes = {"cat",           "linear",          "svd",
                                         "ties",          "ties_svd",        "dare_linear",
                                         "dare_ties",     "dare_linear_svd", "dare_ties_svd",
                                         "magnitude_prune", "magnitude_prune_svd"};

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

/// The type without its `_svd` suffix: the task-tensor merge it uses.
std::string task_merge(const std::string& type) {
  return ends_with(type, "_svd") ? type.substr(0, type.size() - 4) : type == "svd" ? "linear" : type;
}

bool uses_density(const std::string& type) { return task_merge(type) != "linear" && type != "cat"; }

}  // namespace

void WeightedAdapterOptions::validate(size_t adapter_count) const {
  const std::string path = "WeightedAdapterOptions";
  if (std::find(kTypes.begin(), kTypes.end(), combination_type_) == kTypes.end()) {
    throw ConfigError(path + ".combination_type",
                      fmt::format("must be one of {}, got \"{}\"", fmt::join(kTypes, ", "), combination_type_));
  }
  if (majority_sign_method_ != "total" && majority_sign_method_ != "frequency") {
    throw ConfigError(path + ".majority_sign_method",
                      fmt::format("must be \"total\" or \"frequency\", got \"{}\"", majority_sign_method_));
  }
  if (density_ && !(*density_ > 0.0 && *density_ <= 1.0)) {
    throw ConfigError(path + ".density",
                      fmt::format("must be in (0, 1] (the fraction of entries kept), got {}", *density_));
  }
  // With one adapter PEFT combines linearly whatever the type says: no density needed.
  if (!density_ && adapter_count > 1 && uses_density(combination_type_)) {
    throw ConfigError(path + ".density", fmt::format("combination_type \"{}\" prunes: give the fraction of entries "
                                                     "to keep, in (0, 1]",
                                                     combination_type_));
  }
  if (svd_rank_ && *svd_rank_ < 1) {
    throw ConfigError(path + ".svd_rank", fmt::format("must be >= 1, got {}", *svd_rank_));
  }
  if (svd_clamp_ && !(*svd_clamp_ >= 0.0 && *svd_clamp_ <= 1.0)) {
    throw ConfigError(path + ".svd_clamp", fmt::format("is a quantile: must be in [0, 1], got {}", *svd_clamp_));
  }
  if (svd_driver_ && *svd_driver_ != "gesvd" && *svd_driver_ != "gesvdj" && *svd_driver_ != "gesvda") {
    throw ConfigError(path + ".svd_driver",
                      fmt::format("must be \"gesvd\", \"gesvdj\" or \"gesvda\" (cuSOLVER, CUDA only), got \"{}\"",
                                  *svd_driver_));
  }
}

namespace lora {

WeightedPlan plan_weighted(const std::vector<std::string>& adapters, const std::vector<int64_t>& ranks,
                           const WeightedAdapterOptions& options, const std::string& what) {
  if (adapters.empty()) throw PeftError(what + ": no adapters to combine; name at least one");
  options.validate(adapters.size());
  WeightedPlan plan;
  plan.combination_type = adapters.size() == 1 ? "linear" : options.combination_type();
  const std::string& type = plan.combination_type;
  if (type == "cat") {
    for (int64_t r : ranks) plan.rank += r;
  } else if (ends_with(type, "svd")) {
    plan.rank = options.svd_rank() ? *options.svd_rank() : *std::max_element(ranks.begin(), ranks.end());
  } else {
    for (size_t i = 1; i < ranks.size(); ++i) {
      if (ranks[i] == ranks[0]) continue;
      std::vector<std::string> listed;
      for (size_t j = 0; j < ranks.size(); ++j) listed.push_back(fmt::format("\"{}\" r={}", adapters[j], ranks[j]));
      throw PeftError(fmt::format("{}: combination_type \"{}\" needs adapters of one rank, but {}; use \"cat\" or an "
                                  "\"*svd\" type for adapters of different ranks",
                                  what, type, fmt::join(listed, ", ")));
    }
    plan.rank = ranks[0];
  }
  return plan;
}

namespace {

c10::optional<at::Generator> generator_of(const WeightedAdapterOptions& options) {
  if (options.generator().defined()) return options.generator();
  return c10::nullopt;
}

/// merge_utils.prune: magnitude (top-k by |x|) or random (Bernoulli, with the
/// DARE rescale); a density of 1 returns the tensor unchanged and draws nothing.
at::Tensor prune(const at::Tensor& tensor, double density, bool random, const WeightedAdapterOptions& options) {
  if (density >= 1.0) return tensor;
  if (random) {
    const at::Tensor mask = at::bernoulli(at::full_like(tensor, density), generator_of(options));
    return tensor * mask / density;
  }
  at::Tensor mask = at::zeros_like(tensor).reshape({-1});
  const auto k = static_cast<int64_t>(density * static_cast<double>(tensor.numel()));
  const at::Tensor top = std::get<1>(at::topk(tensor.abs().reshape({-1}), k));
  mask.index_fill_(0, top, 1);
  return tensor * mask.reshape(tensor.sizes());
}

/// merge_utils' task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties
/// over `tasks` (stacked on dim 0) with `weights` (float32, as `torch.tensor`
/// makes them from Python floats).
at::Tensor merge_tasks(const std::string& merge, const std::vector<at::Tensor>& tasks, const std::vector<double>& weights,
                       const WeightedAdapterOptions& options) {
  std::vector<at::Tensor> pruned;
  const bool random = merge.rfind("dare", 0) == 0;
  for (const auto& t : tasks) pruned.push_back(merge == "linear" ? t : prune(t, *options.density(), random, options));
  const at::Tensor stacked = at::stack(pruned, 0);
  std::vector<float> w(weights.begin(), weights.end());
  std::vector<int64_t> shape(static_cast<size_t>(stacked.dim()), 1);
  shape[0] = static_cast<int64_t>(w.size());
  const at::Tensor wt = at::tensor(w, at::TensorOptions().dtype(at::kFloat)).to(stacked.device()).view(shape);
  const at::Tensor weighted = stacked * wt;
  if (merge != "ties" && merge != "dare_ties") return weighted.sum(0);
  // Elect the sign on the unweighted (pruned) tensors, then average the agreeing entries.
  const at::Tensor sign = stacked.sign();
  const at::Tensor magnitude = options.majority_sign_method() == "total" ? stacked.sum(0) : sign.sum(0);
  const at::Tensor majority = (magnitude >= 0).to(sign.scalar_type()) * 2 - 1;
  const at::Tensor agree = sign == majority;
  const at::Tensor kept = agree.sum(0).to(weighted.scalar_type()).clamp_min(1.0);
  return (weighted * agree).sum(0) / kept;
}

void check_same_shapes(const std::vector<WeightedInput>& inputs, const std::string& type, const std::string& layer) {
  for (const auto& in : inputs) {
    if (in.a.sizes() == inputs[0].a.sizes() && in.b.sizes() == inputs[0].b.sizes()) continue;
    throw PeftError(fmt::format("{}: combination_type \"{}\" needs the adapters' factors to have one shape on each "
                                "layer, but A is {} here and {} there (rank_pattern?); use \"cat\" or an \"*svd\" type",
                                layer, type, fmt::join(inputs[0].a.sizes(), "x"), fmt::join(in.a.sizes(), "x")));
  }
}

}  // namespace

std::pair<at::Tensor, at::Tensor> combine_weighted(const std::vector<WeightedInput>& inputs, const WeightedPlan& plan,
                                                   const WeightedAdapterOptions& options, const std::string& layer,
                                                   LayerKind kind) {
  if (inputs.empty()) throw PeftError(layer + ": none of the adapters to combine is on this layer");
  const std::string& type = plan.combination_type;
  const at::ScalarType dtype = inputs[0].a.scalar_type();
  if (type == "cat") {
    std::vector<at::Tensor> as, bs;
    for (const auto& in : inputs) {
      as.push_back(in.a * in.weight * in.scale);  // two float32 products, as PEFT's `A * weight * scaling`
      bs.push_back(in.b);
    }
    const at::Tensor a = at::cat(as, 0), b = at::cat(bs, 1);
    at::Tensor new_a = at::zeros({plan.rank, a.size(1)}, a.options().dtype(dtype));
    at::Tensor new_b = at::zeros({b.size(0), plan.rank}, b.options().dtype(dtype));
    new_a.slice(0, 0, a.size(0)).copy_(a);  // layers lacking an adapter keep zero rows, as in PEFT
    new_b.slice(1, 0, b.size(1)).copy_(b);
    return {new_a, new_b};
  }
  const std::string merge = task_merge(type);
  if (!ends_with(type, "svd")) {
    check_same_shapes(inputs, type, layer);
    // sqrt(|weight * scale|) on each side, the sign on A's side only.
    std::vector<double> wa, wb;
    std::vector<at::Tensor> as, bs;
    for (const auto& in : inputs) {
      const double ws = in.weight * in.scale;
      wa.push_back(std::sqrt(std::abs(ws)) * (ws >= 0 ? 1.0 : -1.0));
      wb.push_back(std::sqrt(std::abs(ws)));
      as.push_back(in.a);
      bs.push_back(in.b);
    }
    at::Tensor a = merge_tasks(merge, as, wa, options);
    at::Tensor b = merge_tasks(merge, bs, wb, options);
    return {a.to(dtype), b.to(dtype)};
  }
  // SVD of the combined delta (scale * B @ A of each input), truncated to the rank.
  std::vector<at::Tensor> deltas;
  std::vector<double> weights;
  for (const auto& in : inputs) {
    const bool half = in.a.scalar_type() == at::kHalf || in.a.scalar_type() == at::kBFloat16;
    const at::ScalarType compute = half ? at::kFloat : in.a.scalar_type();
    // PEFT's delta of an embedding is (B @ A)^T, [V, d]: masks are drawn and top-k taken in that order.
    const at::Tensor ba = at::matmul(in.b.to(compute), in.a.to(compute));
    deltas.push_back((kind == LayerKind::Embedding ? ba.t() : ba) * in.scale);
    weights.push_back(in.weight);
  }
  at::Tensor delta = merge_tasks(merge, deltas, weights, options);
  if (kind == LayerKind::Embedding) delta = delta.t();
  const int64_t smallest = std::min(delta.size(0), delta.size(1));
  if (plan.rank > smallest) {
    throw PeftError(fmt::format("{}: combination_type \"{}\" cannot give rank {} to a {}x{} weight; pass svd_rank <= {}",
                                layer, type, plan.rank, delta.size(0), delta.size(1), smallest));
  }
  c10::optional<c10::string_view> driver;
  if (options.svd_driver()) {
    if (!delta.is_cuda()) {
      throw ConfigError("WeightedAdapterOptions.svd_driver",
                        fmt::format("\"{}\" chooses a cuSOLVER routine, but the weights of {} are on {}; leave "
                                    "svd_driver unset on the CPU",
                                    *options.svd_driver(), layer, delta.device().str()));
    }
    driver = c10::string_view(*options.svd_driver());
  }
  auto usv = at::linalg_svd(delta, options.svd_full_matrices(), driver);
  at::Tensor u = std::get<0>(usv).slice(1, 0, plan.rank);
  const at::Tensor s = std::get<1>(usv).slice(0, 0, plan.rank);
  at::Tensor vh = std::get<2>(usv).slice(0, 0, plan.rank);
  u = at::matmul(u, at::diag(s));
  if (options.svd_clamp()) {
    const double hi = at::quantile(at::cat({u.flatten(), vh.flatten()}), *options.svd_clamp()).item<double>();
    u = u.clamp(-hi, hi);
    vh = vh.clamp(-hi, hi);
  }
  return {vh.contiguous().to(dtype), u.contiguous().to(dtype)};
}

}  // namespace lora
}  // namespace d9d::peft
