// The LoRA wrapper around a linear layer.
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/init.h>
#include <d9d/peft/lora/linear.h>
#include <d9d/peft/lora/math.h>
#include <d9d/peft/mixed_batch.h>
#include "reset.h"

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/linear.h>

#include <fmt/format.h>

#include <d9d/detail/torch_compat.h>
#include "dropout.h"

#include <algorithm>

namespace d9d::peft {

namespace {

/// Unregisters the children a wrapper's adapter layout uses.
void clear_children(torch::nn::Module& m, std::initializer_list<const char*> children) {
  const auto registered = m.named_children();
  for (const char* child : children) {
    if (registered.contains(child)) m.unregister_module(child);
  }
}

}  // namespace

LoRALinearAdapterImpl::LoRALinearAdapterImpl(int64_t in_features, int64_t out_features, const LoRAParameters& options,
                                             const at::TensorOptions& like)
    : options_(options), scale_(options.scale()) {
  options_.validate();
  lora_A = register_module("lora_A", torch::nn::Linear(torch::nn::LinearOptions(in_features, options_.r()).bias(false)));
  lora_B = register_module("lora_B", torch::nn::Linear(torch::nn::LinearOptions(options_.r(), out_features).bias(false)));
  dropout = register_module("dropout", torch::nn::Dropout(options_.dropout()));
  lora_A->to(like.device(), like.dtype().toScalarType());
  lora_B->to(like.device(), like.dtype().toScalarType());
  if (options_.use_dora()) {
    lora_magnitude_vector = register_parameter("lora_magnitude_vector", at::empty({out_features}, like));
  }
}

void LoRALinearAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoRALinearAdapter(r=" << options_.r() << ", alpha=" << options_.alpha()
         << ", dropout=" << options_.dropout();
  if (options_.use_rslora()) stream << ", rslora";
  if (options_.use_dora()) stream << ", dora";
  stream << ")";
}

LoRALinearImpl::LoRALinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoRAParameters& options,
                               const std::string& adapter_name)
    : WrappedLinear(std::move(base), *this) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

LoRALinearImpl::LoRALinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoRAParameters& options,
                               const std::string& adapter_name)
    : WrappedLinear(std::move(base), *this) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void LoRALinearImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  const auto& weight = base_weight();
  const LoRAParameters& params = lora_parameters(options);
  // PiSSA and OLoRA move part of the base weight into the adapter: another
  // adapter on the same layer would see the residual as its base (PEFT warns
  // and goes on).
  for (const auto& [other, a] : entries_) {
    if (init_changes_base(params.init()) || init_changes_base(a->options().init())) {
      const auto& changing = init_changes_base(params.init()) ? params : a->options();
      throw PeftError(fmt::format(
          "add_adapter(\"{}\"): this layer holds adapter \"{}\", and a {} adapter changes the base weight to its "
          "residual, so the two cannot share a layer. Save the {} adapter converted to plain LoRA "
          "(hf::SaveAdapterOptions::convert_to_lora) and load that instead",
          name, other, lora_init_name(changing), lora_init_name(changing)));
    }
  }
  const int64_t most = std::min(weight.size(0), weight.size(1));
  if (init_changes_base(params.init()) && params.r() > most) {
    throw PeftError(fmt::format("add_adapter(\"{}\"): the {} initialisation takes rank r = {} from a [{}, {}] weight, "
                                "whose rank is at most {}; use r <= {}",
                                name, lora_init_name(params), params.r(), weight.size(0), weight.size(1), most, most));
  }
  auto adapter = std::make_shared<LoRALinearAdapterImpl>(weight.size(1), weight.size(0), params, weight.options());
  reset_adapter(*adapter);
  try {
    append(name, adapter);
  } catch (...) {
    restore_base(*adapter);
    throw;
  }
}

void LoRALinearImpl::restore_base(LoRALinearAdapterImpl& a) {
  if (!a.base_is_residual) return;
  if (!a.initial_A.defined()) {
    throw PeftError("this PiSSA/OLoRA adapter's base weight is the residual of factors that were loaded from a "
                    "checkpoint, not computed here, so the original weight cannot be restored; merge the adapter "
                    "instead (merge_peft), or load the original base weights again");
  }
  torch::NoGradGuard no_grad;
  at::Tensor weight = base_weight();
  weight.add_((a.initial_B.matmul(a.initial_A) * a.scale()).to(weight.scalar_type()));
  a.base_is_residual = false;
}

void LoRALinearImpl::delete_adapter(const std::string& name) {
  if (auto a = find(name); a && !is_merged(name)) restore_base(*a);
  AdapterSetLayer<LoRALinearAdapterImpl>::delete_adapter(name);
}

bool LoRALinearImpl::supports_mixed_batch() const {
  for (const auto& [name, a] : entries_) {
    if (init_changes_base(a->options().init())) return false;
  }
  return true;
}

void LoRALinearImpl::base_reloaded(LoRALinearAdapterImpl& a, bool factors_loaded) {
  if (factors_loaded) {
    // A checkpoint of the trained model: its base is already the residual of
    // factors this process did not compute.
    a.base_is_residual = true;
    a.initial_A = at::Tensor();
    a.initial_B = at::Tensor();
    return;
  }
  a.base_is_residual = false;  // the loader wrote the original weight
  reset_adapter(a);
}

at::Tensor LoRALinearImpl::original_base_term(const at::Tensor& input) const {
  for (const auto& [name, a] : entries_) {
    if (!a->base_is_residual || is_merged(name)) continue;
    if (!a->initial_A.defined()) {
      throw PeftError(fmt::format("adapter \"{}\" is not in effect, so this layer would compute its original base, "
                                  "but its base weight holds the {} residual of factors loaded from a checkpoint; "
                                  "keep the adapter enabled and active, or merge it",
                                  name, lora_init_name(a->options())));
    }
    const auto dtype = input.scalar_type();
    return at::matmul(at::matmul(input, a->initial_A.to(dtype).t()), a->initial_B.to(dtype).t()) * a->scale();
  }
  return at::Tensor();
}

void LoRALinearImpl::relayout() {
  clear_children(*this, {"lora_A", "lora_B", "dropout"});
  clear_further_adapters();
  d9d::detail::torch_compat::unregister_parameter(*this, "lora_magnitude_vector");
  lora_A = torch::nn::Linear(nullptr);
  lora_B = torch::nn::Linear(nullptr);
  dropout = torch::nn::Dropout(nullptr);
  lora_magnitude_vector = at::Tensor();
  if (entries_.empty()) return;
  const auto& top = entries_.front().second;
  lora_A = register_module("lora_A", top->lora_A);
  lora_B = register_module("lora_B", top->lora_B);
  dropout = register_module("dropout", top->dropout);
  if (top->options().use_dora()) {
    lora_magnitude_vector = register_parameter("lora_magnitude_vector", top->lora_magnitude_vector,
                                               top->lora_magnitude_vector.requires_grad());
  }
  register_further_adapters();
}

void LoRALinearImpl::reset_adapter(LoRALinearAdapterImpl& a) {
  if (!init_changes_base(a.options().init())) {
    detail::reset_lora_factors(a);
  } else {
    // PEFT's pissa_init / olora_init: the factors from the (original) base
    // weight in float32, and the base keeps the residual.
    restore_base(a);
    torch::NoGradGuard no_grad;
    at::Tensor weight = base_weight();
    const auto& o = a.options();
    auto [A, B] = o.init() == LoRAInit::PiSSA ? lora::pissa_factors(weight, o.r(), a.scale(), o.pissa_niter())
                                              : lora::olora_factors(weight, o.r());
    a.lora_A->weight.copy_(A);
    a.lora_B->weight.copy_(B);
    a.initial_A = A;
    a.initial_B = B;
    weight.copy_((weight.to(at::kFloat) - B.matmul(A) * a.scale()).to(weight.scalar_type()));
    a.base_is_residual = true;
  }
  if (a.options().use_dora()) reset_adapter_magnitude(a);
}

void LoRALinearImpl::reset_adapter_magnitude(LoRALinearAdapterImpl& a) {
  torch::NoGradGuard no_grad;
  const at::Tensor norm = lora::dora_norm(lora::LayerKind::Linear, base_weight(), a.lora_A->weight, a.lora_B->weight,
                                          a.scale());
  a.lora_magnitude_vector.copy_(norm);
}

torch::nn::AnyModule LoRALinearImpl::unwrap() {
  for (auto& [name, a] : entries_) {
    if (!is_merged(name)) restore_base(*a);
  }
  return unwrap_base();
}

at::Tensor LoRALinearImpl::dora_scale(const LoRALinearAdapterImpl& a) const {
  // PEFT detaches the norm: the magnitude learns the scale, B and A the direction.
  at::Tensor norm;
  {
    torch::NoGradGuard no_grad;
    norm = at::linalg_vector_norm(base_weight() + a.scale() * a.lora_B->weight.mm(a.lora_A->weight), 2, {1});
  }
  return (a.lora_magnitude_vector / norm.to(a.lora_magnitude_vector.scalar_type())).view({1, -1});
}

at::Tensor LoRALinearImpl::forward(const at::Tensor& input) {
  const at::Tensor& weight = base_weight();
  const at::Tensor& bias = base_bias();
  if (!enabled_ || (active_.empty() && mixed_batch() == nullptr)) {
    // No adapter in effect: the original base, also where a PiSSA or OLoRA
    // adapter left the residual in the base weight.
    at::Tensor out = torch::nn::functional::linear(input, weight, bias);
    const at::Tensor original = original_base_term(input);
    return original.defined() ? out + original : out;
  }
  if (mixed_batch() != nullptr) return forward_mixed(input);
  if (active_.size() > 1 || !merged_.empty()) return forward_general(input);
  LoRALinearAdapterImpl& a = *find(active_.front());
  if (a.options().use_dora() || a.lora_A->weight.scalar_type() != input.scalar_type()) return forward_general(input);
  return forward_fused(input, a);
}

at::Tensor LoRALinearImpl::forward_fused(const at::Tensor& input, LoRALinearAdapterImpl& a) {
  // base + scale * B(A(h)) on 2-D views: the low-rank product is accumulated
  // into the base output in place by one addmm_, whose alpha carries the scale.
  const at::Tensor& weight = base_weight();
  const at::Tensor& bias = base_bias();
  const double p = a.options().dropout();
  const int64_t in_features = weight.size(1);
  const at::Tensor x2 = input.reshape({-1, in_features});
  at::Tensor h2 = x2;
  double alpha = a.scale();
  if (p > 0.0 && is_training()) {
    if (lora::cpu_dropout_applies(x2)) {
      // Kept inputs stay at 1x and 1/(1-p) joins addmm_'s alpha: one multiply
      // per input element fewer.
      h2 = lora::CpuDropout::apply(x2, p, 1.0);
      alpha /= (1.0 - p);
    } else {
      h2 = a.dropout->forward(x2);
    }
  }
  at::Tensor out = bias.defined() ? at::addmm(bias, x2, weight.t()) : at::mm(x2, weight.t());
  out.addmm_(at::mm(h2, a.lora_A->weight.t()), a.lora_B->weight.t(), /*beta=*/1.0, /*alpha=*/alpha);
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = weight.size(0);
  return out.view(shape);
}

at::Tensor LoRALinearImpl::forward_general(const at::Tensor& input) {
  // Several active adapters, DoRA, merged adapters, or adapters in another
  // dtype than the input (cast_adapter_dtype): each unmerged adapter adds its
  // own term to the base output, computed in its own dtype, as PEFT does.
  const at::Tensor& weight = base_weight();
  const at::Tensor& bias = base_bias();
  const at::Tensor out = torch::nn::functional::linear(input, weight, bias);
  at::Tensor result = out;
  for (const auto& name : active_) {
    if (is_merged(name)) continue;
    LoRALinearAdapterImpl& a = *find(name);
    const double p = a.options().dropout();
    const bool dropping = p > 0.0 && is_training();
    at::Tensor h = input;
    if (dropping) {
      h = lora::cpu_dropout_applies(input) ? lora::CpuDropout::apply(input, p, 1.0 / (1.0 - p))
                                           : a.dropout->forward(input);
    }
    const auto dtype = a.lora_A->weight.scalar_type();
    const at::Tensor low_rank = a.lora_B->forward(a.lora_A->forward(h.to(dtype)));
    at::Tensor term;
    if (a.options().use_dora()) {
      const at::Tensor m_scale = dora_scale(a);
      // Without dropout the base output (less its bias) is reused, as PEFT does.
      const at::Tensor base_no_bias =
          dropping ? torch::nn::functional::linear(h, weight) : (bias.defined() ? out - bias : out);
      term = (m_scale - 1) * base_no_bias + m_scale * low_rank * a.scale();
    } else {
      term = low_rank * a.scale();
    }
    result = result + term.to(out.scalar_type());
  }
  return result;
}


/// Adapters of one mixed batch that compute alike (plain LoRA in the input's
/// dtype, no dropout at work) as two batched products: each adapter's rows
/// padded to the largest segment (`padded_rows`), ranks padded with zeros to
/// the largest. Padding rows repeat a row of their segment and are scaled by
/// zero. What depends only on the batch and the weights (the row index, the
/// scales, the stacked weights) is built once and reused while the weights'
/// version counters stay the same and no gradient is wanted.
struct LoRALinearImpl::MixedCache {
  std::vector<std::string> rows;  // the batch's row adapters (a new scope per batch is the common use)
  std::vector<const void*> weights;
  std::vector<int64_t> versions;
  at::Tensor index, scale, a, b;

  static void describe(const std::vector<LoRALinearAdapterImpl*>& adapters, std::vector<const void*>& weights,
                       std::vector<int64_t>& versions) {
    for (const auto* adapter : adapters) {
      for (const at::Tensor* w : {&adapter->lora_A->weight, &adapter->lora_B->weight}) {
        weights.push_back(w->unsafeGetTensorImpl());
        versions.push_back(w->_version());
      }
    }
  }
};

namespace {

at::Tensor stacked(const std::vector<at::Tensor>& weights, int64_t max_rank, bool rank_is_rows) {
  std::vector<at::Tensor> padded;
  for (const auto& w : weights) {
    const int64_t pad = max_rank - w.size(rank_is_rows ? 0 : 1);
    padded.push_back(pad == 0 ? w : at::constant_pad_nd(w, rank_is_rows ? std::vector<int64_t>{0, 0, 0, pad}
                                                                         : std::vector<int64_t>{0, pad}));
  }
  return at::stack(padded);
}

}  // namespace

at::Tensor LoRALinearImpl::forward_mixed_batched(const at::Tensor& input, at::Tensor& out,
                                                const std::vector<const MixedBatch::Segment*>& segments,
                                                const std::vector<LoRALinearAdapterImpl*>& adapters,
                                                int64_t padded_rows, int64_t max_rank) {
  const MixedBatch& batch = *mixed_batch();
  const auto groups = static_cast<int64_t>(segments.size());
  bool grad = false;
  if (torch::GradMode::is_enabled()) {
    for (const auto* a : adapters) grad = grad || a->lora_A->weight.requires_grad() || a->lora_B->weight.requires_grad();
  }
  std::vector<const void*> weights;
  std::vector<int64_t> versions;
  MixedCache::describe(adapters, weights, versions);
  const bool reuse = !grad && mixed_cache_ && mixed_cache_->weights == weights &&
                     mixed_cache_->versions == versions && mixed_cache_->index.device() == input.device() &&
                     mixed_cache_->a.scalar_type() == input.scalar_type() &&
                     mixed_cache_->rows == batch.row_adapters();
  std::shared_ptr<MixedCache> plan = reuse ? mixed_cache_ : std::make_shared<MixedCache>();
  if (!reuse) {
    const auto& order = batch.order_indices();
    std::vector<int64_t> padded;
    std::vector<float> scales;
    padded.reserve(static_cast<size_t>(groups * padded_rows));
    scales.reserve(padded.capacity());
    for (int64_t g = 0; g < groups; ++g) {
      const auto& segment = *segments[static_cast<size_t>(g)];
      const int64_t n = segment.end - segment.begin;
      for (int64_t j = 0; j < padded_rows; ++j) {
        padded.push_back(order[static_cast<size_t>(segment.begin + (j < n ? j : 0))]);
        scales.push_back(j < n ? static_cast<float>(adapters[static_cast<size_t>(g)]->scale()) : 0.0f);
      }
    }
    // In float, as the single-adapter paths apply it: a bf16 scale would round 16/12 or alpha/sqrt(r).
    plan->index = at::tensor(padded, at::TensorOptions().dtype(at::kLong)).to(input.device());
    plan->scale = at::tensor(scales, at::TensorOptions().dtype(at::kFloat)).to(input.device());
    std::vector<at::Tensor> a_weights, b_weights;
    for (const auto* a : adapters) {
      a_weights.push_back(a->lora_A->weight);  // [r, in]
      b_weights.push_back(a->lora_B->weight);  // [out, r]
    }
    plan->a = stacked(a_weights, max_rank, true).transpose(1, 2);   // [G, in, R]
    plan->b = stacked(b_weights, max_rank, false).transpose(1, 2);  // [G, R, out]
    if (!grad) {
      plan->rows = batch.row_adapters();
      plan->weights = std::move(weights);
      plan->versions = std::move(versions);
      mixed_cache_ = plan;
    }
  }
  const int64_t in_features = input.size(-1);
  const int64_t out_features = out.size(-1);
  const int64_t per_row = input.numel() / std::max<int64_t>(1, input.size(0) * in_features);
  // [G, padded_rows * per_row, in] -> [G, ..., R] -> [G, ..., out]
  const at::Tensor x = input.index_select(0, plan->index).view({groups, padded_rows * per_row, in_features});
  at::Tensor low = at::bmm(at::bmm(x, plan->a), plan->b);
  low = (low.view({groups, padded_rows, per_row, out_features}) * plan->scale.view({groups, padded_rows, 1, 1}))
            .to(input.scalar_type());
  std::vector<int64_t> shape = input.sizes().vec();
  shape.front() = groups * padded_rows;
  shape.back() = out_features;
  // Padding rows were scaled by zero: adding them back changes nothing.
  out.index_add_(0, plan->index, low.view(shape));
  return out;
}

at::Tensor LoRALinearImpl::forward_mixed(const at::Tensor& input) {
  check_mixed_batch_rows(input);
  check_mixed_batch_unmerged();
  const auto held =
      mixed_batch()->select([this](const std::string& name) { return find(name) != nullptr; }, input.device());
  std::vector<LoRALinearAdapterImpl*> adapters;
  bool alike = true;
  int64_t largest = 0, rows = 0, max_rank = 0;
  for (const auto* segment : held.segments) {
    LoRALinearAdapterImpl& a = *find(segment->adapter);
    adapters.push_back(&a);
    alike = alike && !a.options().use_dora() && !(a.options().dropout() > 0.0 && is_training()) &&
            a.lora_A->weight.scalar_type() == input.scalar_type();
    largest = std::max(largest, segment->end - segment->begin);
    rows += segment->end - segment->begin;
    max_rank = std::max(max_rank, a.lora_A->weight.size(0));
  }
  // Every row on one adapter: the ordinary fused forward.
  if (adapters.size() == 1 && alike && rows == mixed_batch()->rows()) return forward_fused(input, *adapters.front());

  const at::Tensor& weight = base_weight();
  const at::Tensor& bias = base_bias();
  at::Tensor out = torch::nn::functional::linear(input, weight, bias);
  if (held.segments.empty()) return out;

  // Adapters that compute alike, in segments of similar size: two batched
  // products for all of them, when padding to the largest segment at most
  // doubles the rows.
  if (alike && static_cast<int64_t>(held.segments.size()) * largest <= 2 * rows) {
    return forward_mixed_batched(input, out, held.segments, adapters, largest, max_rank);
  }

  // Otherwise one gather puts each adapter's rows in one contiguous segment,
  // and each adapter runs its low-rank product on its segment alone.
  const at::Tensor& order = held.order;
  const int64_t in_features = weight.size(1);
  const int64_t out_features = weight.size(0);
  const int64_t per_row = input.numel() / std::max<int64_t>(1, input.size(0) * in_features);
  const at::Tensor x = input.index_select(0, order).reshape({-1, in_features});
  at::Tensor base_rows;  // DoRA: the base output without its bias, for the gathered rows
  std::vector<at::Tensor> terms;
  int64_t begin = 0;
  for (size_t i = 0; i < held.segments.size(); ++i) {
    const auto* segment = held.segments[i];
    LoRALinearAdapterImpl& a = *adapters[i];
    const int64_t count = (segment->end - segment->begin) * per_row;
    at::Tensor h = x.narrow(0, begin, count);
    const double p = a.options().dropout();
    const bool dropping = p > 0.0 && is_training();
    if (dropping) {
      h = lora::cpu_dropout_applies(h) ? lora::CpuDropout::apply(h, p, 1.0 / (1.0 - p)) : a.dropout->forward(h);
    }
    const at::Tensor low_rank = a.lora_B->forward(a.lora_A->forward(h.to(a.lora_A->weight.scalar_type())));
    at::Tensor term;
    if (a.options().use_dora()) {
      at::Tensor base_segment;
      if (dropping) {
        base_segment = torch::nn::functional::linear(h, weight);
      } else {
        if (!base_rows.defined()) {
          base_rows = (bias.defined() ? out - bias : out).index_select(0, order).reshape({-1, out_features});
        }
        base_segment = base_rows.narrow(0, begin, count);
      }
      const at::Tensor m_scale = dora_scale(a);
      term = (m_scale - 1) * base_segment + m_scale * low_rank * a.scale();
    } else {
      term = low_rank * a.scale();
    }
    terms.push_back(term.to(out.scalar_type()));
    begin += count;
  }
  std::vector<int64_t> shape = input.sizes().vec();
  shape.front() = order.size(0);
  shape.back() = out_features;
  out.index_add_(0, order, (terms.size() == 1 ? terms.front() : at::cat(terms)).view(shape));
  return out;
}

at::Tensor LoRALinearImpl::delta_weight(const std::string& name) const {
  const auto& a = adapter(name);
  if (a.options().use_dora()) throw PeftError("delta_weight: a DoRA adapter's merge is not a sum; use merge_adapter");
  return lora::delta_weight(lora::LayerKind::Linear, a.lora_A->weight, a.lora_B->weight, a.scale(), base_weight())
      .to(base_weight().scalar_type());
}

void LoRALinearImpl::merge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  auto& a = require_merged(name, false, "merge_adapter");
  const at::Tensor& weight = base_weight();
  at::Tensor norm;
  lora::merge_in_place(lora::LayerKind::Linear, weight, a.lora_A->weight, a.lora_B->weight, a.scale(),
                       a.lora_magnitude_vector, &norm);
  a.merged_norm = norm;
  set_merged(name, true);
}

void LoRALinearImpl::unmerge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  auto& a = require_merged(name, true, "unmerge_adapter");
  const at::Tensor& weight = base_weight();
  lora::unmerge_in_place(lora::LayerKind::Linear, weight, a.lora_A->weight, a.lora_B->weight, a.scale(),
                         a.lora_magnitude_vector, a.merged_norm);
  a.merged_norm = at::Tensor();
  set_merged(name, false);
}

void LoRALinearImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoRALinear"); }

}  // namespace d9d::peft
