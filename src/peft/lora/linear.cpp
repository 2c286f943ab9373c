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

  // base + scale * B(A(h)) on 2-D views: the low-rank product is accumulated
  // into the base output in place by one addmm_, whose alpha carries the scale.
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

at::Tensor LoRALinearImpl::forward_mixed(const at::Tensor& input) {
  check_mixed_batch_rows(input);
  const at::Tensor& weight = base_weight();
  const at::Tensor& bias = base_bias();
  at::Tensor out = torch::nn::functional::linear(input, weight, bias);
  const auto held =
      mixed_batch()->select([this](const std::string& name) { return find(name) != nullptr; }, input.device());
  if (held.segments.empty()) return out;
  const at::Tensor& order = held.order;

  // One gather puts each adapter's rows in one contiguous segment; each
  // adapter then runs its low-rank product on its segment alone.
  const int64_t in_features = weight.size(1);
  const int64_t out_features = weight.size(0);
  const int64_t per_row = input.numel() / std::max<int64_t>(1, input.size(0) * in_features);
  const at::Tensor x = input.index_select(0, order).reshape({-1, in_features});
  at::Tensor base_rows;  // DoRA: the base output without its bias, for the gathered rows
  std::vector<at::Tensor> terms;
  int64_t begin = 0;
  for (const auto* segment : held.segments) {
    LoRALinearAdapterImpl& a = *find(segment->adapter);
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
