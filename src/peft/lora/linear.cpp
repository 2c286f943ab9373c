// The LoRA wrapper around a linear layer.
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/linear.h>
#include <d9d/peft/lora/math.h>
#include <d9d/peft/mixed_batch.h>

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
  auto adapter =
      std::make_shared<LoRALinearAdapterImpl>(weight.size(1), weight.size(0), lora_parameters(options), weight.options());
  reset_adapter(*adapter);
  append(name, std::move(adapter));
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
  torch::NoGradGuard no_grad;
  switch (a.options().init()) {
    case LoRAInit::Default:
      a.lora_A->reset_parameters();
      a.lora_B->weight.zero_();
      break;
    case LoRAInit::Gaussian:
      a.lora_A->weight.normal_(0.0, 1.0 / static_cast<double>(a.options().r()));
      a.lora_B->weight.zero_();
      break;
    case LoRAInit::Random:
      a.lora_A->reset_parameters();
      a.lora_B->reset_parameters();
      break;
  }
  if (a.options().use_dora()) reset_adapter_magnitude(a);
}

void LoRALinearImpl::reset_adapter_magnitude(LoRALinearAdapterImpl& a) {
  torch::NoGradGuard no_grad;
  const at::Tensor norm = lora::dora_norm(lora::LayerKind::Linear, base_weight(), a.lora_A->weight, a.lora_B->weight,
                                          a.scale());
  a.lora_magnitude_vector.copy_(norm);
}

torch::nn::AnyModule LoRALinearImpl::unwrap() { return unwrap_base(); }

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
  if (!enabled_) return torch::nn::functional::linear(input, weight, bias);
  if (mixed_batch() != nullptr) return forward_mixed(input);
  if (active_.empty()) return torch::nn::functional::linear(input, weight, bias);
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

namespace {

/// Adds `terms` (one row per entry of `rows`, in that order) to the rows
/// `rows` of `out`; rows of `out` not in `rows` get nothing. One gather and
/// one add: `index_add_` over the first dimension runs a loop of small adds
/// per index on the CPU.
void add_rows(at::Tensor& out, const at::Tensor& terms, const std::vector<int64_t>& rows) {
  const int64_t n = out.size(0);
  // Each row of `out` reads its term, or a zero row appended at the end.
  std::vector<int64_t> source(static_cast<size_t>(n), static_cast<int64_t>(rows.size()));
  for (size_t i = 0; i < rows.size(); ++i) source[static_cast<size_t>(rows[i])] = static_cast<int64_t>(i);
  const bool complete = rows.size() == static_cast<size_t>(n);
  std::vector<int64_t> zero_shape = terms.sizes().vec();
  zero_shape.front() = 1;
  const at::Tensor padded = complete ? terms : at::cat({terms, at::zeros(zero_shape, terms.options())});
  out.add_(padded.index_select(0, at::tensor(source, at::TensorOptions().dtype(at::kLong)).to(out.device())));
}

/// Adapters of one mixed batch that compute alike (plain LoRA in the input's
/// dtype, no dropout at work) as two batched products: each adapter's rows
/// padded to the largest segment (`padded_rows`), ranks padded with zeros to
/// the largest. Padding rows repeat a row of their segment and are scaled by
/// zero.
at::Tensor mixed_low_rank_batched(const at::Tensor& input, at::Tensor& out, const MixedBatch& batch,
                                  const std::vector<const MixedBatch::Segment*>& segments,
                                  const std::vector<LoRALinearAdapterImpl*>& adapters, int64_t padded_rows,
                                  int64_t max_rank) {
  const auto groups = static_cast<int64_t>(segments.size());
  const auto& order = batch.order_indices();
  std::vector<int64_t> padded, real_rows, real_slots;
  std::vector<float> scales;
  padded.reserve(static_cast<size_t>(groups * padded_rows));
  scales.reserve(padded.capacity());
  for (int64_t g = 0; g < groups; ++g) {
    const auto& segment = *segments[static_cast<size_t>(g)];
    const int64_t n = segment.end - segment.begin;
    for (int64_t j = 0; j < padded_rows; ++j) {
      const int64_t row = order[static_cast<size_t>(segment.begin + (j < n ? j : 0))];
      if (j < n) {
        real_rows.push_back(row);
        real_slots.push_back(static_cast<int64_t>(padded.size()));
      }
      padded.push_back(row);
      scales.push_back(j < n ? static_cast<float>(adapters[static_cast<size_t>(g)]->scale()) : 0.0f);
    }
  }
  const auto device = input.device();
  const auto long_options = at::TensorOptions().dtype(at::kLong);
  const at::Tensor index = at::tensor(padded, long_options).to(device);
  const at::Tensor scale = at::tensor(scales, at::TensorOptions().dtype(at::kFloat)).to(device, input.scalar_type());

  std::vector<at::Tensor> a_weights, b_weights;
  for (const auto* a : adapters) {
    const at::Tensor& wa = a->lora_A->weight;  // [r, in]
    const at::Tensor& wb = a->lora_B->weight;  // [out, r]
    const int64_t pad = max_rank - wa.size(0);
    a_weights.push_back(pad == 0 ? wa : at::constant_pad_nd(wa, {0, 0, 0, pad}));
    b_weights.push_back(pad == 0 ? wb : at::constant_pad_nd(wb, {0, pad}));
  }
  const int64_t in_features = input.size(-1);
  const int64_t out_features = out.size(-1);
  const int64_t per_row = input.numel() / std::max<int64_t>(1, input.size(0) * in_features);
  // [G, padded_rows * per_row, in] -> [G, ..., r] -> [G, ..., out]
  const at::Tensor x = input.index_select(0, index).view({groups, padded_rows * per_row, in_features});
  at::Tensor low = at::bmm(at::bmm(x, at::stack(a_weights).transpose(1, 2)), at::stack(b_weights).transpose(1, 2));
  low = low.view({groups, padded_rows, per_row, out_features}) * scale.view({groups, padded_rows, 1, 1});
  std::vector<int64_t> shape = input.sizes().vec();
  shape.front() = groups * padded_rows;
  shape.back() = out_features;
  // Only the real rows go back: padding rows are left out of the gather.
  add_rows(out, low.view(shape).index_select(0, at::tensor(real_slots, long_options).to(device)), real_rows);
  return out;
}

}  // namespace

at::Tensor LoRALinearImpl::forward_mixed(const at::Tensor& input) {
  check_mixed_batch_rows(input);
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
    max_rank = std::max(max_rank, a.options().r());
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
    return mixed_low_rank_batched(input, out, *mixed_batch(), held.segments, adapters, largest, max_rank);
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
  std::vector<int64_t> order_rows;
  for (const auto* segment : held.segments) {
    const auto& all = mixed_batch()->order_indices();
    order_rows.insert(order_rows.end(), all.begin() + segment->begin, all.begin() + segment->end);
  }
  add_rows(out, (terms.size() == 1 ? terms.front() : at::cat(terms)).view(shape), order_rows);
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
