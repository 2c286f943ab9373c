// The LoRA wrapper around a Conv2d layer, as PEFT's lora.Conv2d.
#include <d9d/detail/torch_compat.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/conv2d.h>
#include <d9d/peft/lora/conv_math.h>
#include "reset.h"

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <fmt/format.h>

#include <type_traits>
#include "dropout.h"

namespace d9d::peft {

namespace {

bool zeros_padding(const torch::nn::Conv2dOptions& o) {
  // Unqualified `visit`: c10::visit (LibTorch 1.13) or std::visit (2.x), found by argument.
  return visit([](const auto& m) { return std::is_same_v<std::decay_t<decltype(m)>, torch::enumtype::kZeros>; },
               o.padding_mode());
}

}  // namespace

std::string lora_conv2d_refusal(const std::string& name, const torch::nn::Conv2dOptions& o) {
  if (o.groups() != 1) {
    return fmt::format("LoRA: '{}' is a Conv2d with groups = {}; LoRA adapts Conv2d layers with groups = 1 only "
                       "(PEFT cannot merge grouped convolutions). Narrow the targets to exclude it",
                       name, o.groups());
  }
  if (!zeros_padding(o)) {
    return fmt::format("LoRA: '{}' is a Conv2d with padding_mode {}; PEFT's lora_A pads with zeros, so its term "
                       "would not be the base's, and a merge would change the outputs. LoRA adapts Conv2d layers "
                       "with padding_mode zeros only; narrow the targets to exclude it",
                       name, torch::enumtype::get_enum_name(o.padding_mode()));
  }
  const auto& k = *o.kernel_size();
  const auto& d = *o.dilation();
  if ((d[0] != 1 && k[0] != 1) || (d[1] != 1 && k[1] != 1)) {
    return fmt::format("LoRA: '{}' is a Conv2d with dilation ({}, {}); PEFT's lora_A is built without the "
                       "dilation, so its output does not line up with the base's. LoRA adapts undilated Conv2d "
                       "layers only; narrow the targets to exclude it",
                       name, d[0], d[1]);
  }
  return {};
}

LoRAConv2dAdapterImpl::LoRAConv2dAdapterImpl(const torch::nn::Conv2dOptions& base, const LoRAParameters& options,
                                             const at::TensorOptions& like)
    : options_(options), scale_(options.scale()) {
  options_.validate();
  lora_A = register_module("lora_A", torch::nn::Conv2d(torch::nn::Conv2dOptions(base.in_channels(), options_.r(),
                                                                                base.kernel_size())
                                                           .stride(base.stride())
                                                           .padding(base.padding())
                                                           .bias(false)));
  lora_B = register_module("lora_B",
                           torch::nn::Conv2d(torch::nn::Conv2dOptions(options_.r(), base.out_channels(), 1).bias(false)));
  dropout = register_module("dropout", torch::nn::Dropout(options_.dropout()));
  lora_A->to(like.device(), like.dtype().toScalarType());
  lora_B->to(like.device(), like.dtype().toScalarType());
  if (options_.use_dora()) {
    lora_magnitude_vector = register_parameter("lora_magnitude_vector", at::empty({1, base.out_channels(), 1, 1}, like));
  }
}

void LoRAConv2dAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoRAConv2dAdapter(r=" << options_.r() << ", alpha=" << options_.alpha()
         << ", dropout=" << options_.dropout();
  if (options_.use_rslora()) stream << ", rslora";
  if (options_.use_dora()) stream << ", dora";
  stream << ")";
}

LoRAConv2dImpl::LoRAConv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base_, const LoRAParameters& options,
                               const std::string& adapter_name)
    : base(std::move(base_)) {
  if (!base) throw PeftError("LoRAConv2dImpl: the base layer is null");
  if (auto why = lora_conv2d_refusal("the base layer", base->options); !why.empty()) throw PeftError(why);
  register_module("base", base);
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void LoRAConv2dImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  auto adapter = std::make_shared<LoRAConv2dAdapterImpl>(base->options, lora_parameters(options), base->weight.options());
  reset_adapter(*adapter);
  append(name, std::move(adapter));
}

void LoRAConv2dImpl::relayout() {
  const auto registered = named_children();
  for (const char* child : {"lora_A", "lora_B", "dropout"}) {
    if (registered.contains(child)) unregister_module(child);
  }
  clear_further_adapters();
  d9d::detail::torch_compat::unregister_parameter(*this, "lora_magnitude_vector");
  lora_A = torch::nn::Conv2d(nullptr);
  lora_B = torch::nn::Conv2d(nullptr);
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

void LoRAConv2dImpl::reset_adapter(LoRAConv2dAdapterImpl& a) {
  // PEFT's reset_lora_parameters for conv layers: A kaiming-uniform (a = sqrt(5)), B zeros.
  detail::reset_lora_factors(a);
  if (a.options().use_dora()) reset_adapter_magnitude(a);
}

void LoRAConv2dImpl::reset_adapter_magnitude(LoRAConv2dAdapterImpl& a) {
  torch::NoGradGuard no_grad;
  a.lora_magnitude_vector.copy_(lora::conv_dora_norm(base->weight, a.lora_A->weight, a.lora_B->weight, a.scale()));
}

torch::nn::AnyModule LoRAConv2dImpl::unwrap() {
  base->clear_override();
  return torch::nn::AnyModule(base);
}

at::Tensor LoRAConv2dImpl::dora_scale(const LoRAConv2dAdapterImpl& a) const {
  // PEFT detaches the norm: the magnitude learns the scale, B and A the direction.
  at::Tensor norm;
  {
    torch::NoGradGuard no_grad;
    norm = lora::conv_dora_norm(base->weight, a.lora_A->weight, a.lora_B->weight, a.scale());
  }
  return a.lora_magnitude_vector / norm.to(a.lora_magnitude_vector.scalar_type());
}

namespace {

/// lora_B's 1x1 convolution (stride 1, no bias, groups 1) of `h` `[N, r, H,
/// W]` (or `[r, H, W]`) as one matrix product over the channels: the same
/// numbers to float rounding, and on the CPU far faster than LibTorch's
/// convolution with so few input channels (8 -> 64 channels on 8x32x32
/// inputs, torch 2.15, 2 threads: 0.10 ms against 1.45 ms).
at::Tensor channel_product(const at::Tensor& weight, const at::Tensor& h) {
  const at::Tensor w = weight.reshape({weight.size(0), weight.size(1)});
  if (h.dim() == 3) return at::matmul(w, h.reshape({h.size(0), -1})).view({w.size(0), h.size(1), h.size(2)});
  return at::matmul(w, h.reshape({h.size(0), h.size(1), -1})).view({h.size(0), w.size(0), h.size(2), h.size(3)});
}

}  // namespace

at::Tensor LoRAConv2dImpl::forward(const at::Tensor& input) {
  if (!enabled_ || active_.empty()) return base->forward_base(input);
  // Without autograd (inference) and without dropout, one convolution with
  // W + ΣΔW (ΔW = scale·B∘A, PEFT's merge) computes the same as the base plus
  // each adapter's two convolutions, to float rounding, at about the plain
  // layer's cost. Training keeps the separate terms: their backward needs no
  // full-size weight gradient.
  const at::ScalarType type = base->weight.scalar_type();
  if (!at::GradMode::is_enabled() && input.scalar_type() == type && (type == at::kFloat || type == at::kDouble)) {
    at::Tensor folded;
    bool foldable = true;
    for (const auto& name : active_) {
      if (is_merged(name)) continue;
      const LoRAConv2dAdapterImpl& a = *find(name);
      foldable = foldable && !a.options().use_dora() && !(a.options().dropout() > 0.0 && is_training()) &&
                 a.lora_A->weight.scalar_type() == type;
      if (!foldable) break;
      const at::Tensor delta = lora::conv_delta_weight(a.lora_A->weight, a.lora_B->weight, a.scale(), base->weight);
      folded = folded.defined() ? folded + delta : base->weight + delta;
    }
    if (foldable && folded.defined()) return base->convolve(input, folded, base->bias);
  }
  const at::Tensor out = base->forward_base(input);
  const at::Tensor& bias = base->bias;
  at::Tensor result = out;
  for (const auto& name : active_) {
    if (is_merged(name)) continue;
    LoRAConv2dAdapterImpl& a = *find(name);
    const double p = a.options().dropout();
    const bool dropping = p > 0.0 && is_training();
    at::Tensor h = input;
    if (dropping) {
      h = lora::cpu_dropout_applies(input) ? lora::CpuDropout::apply(input, p, 1.0 / (1.0 - p))
                                           : a.dropout->forward(input);
    }
    const at::Tensor low_rank =
        channel_product(a.lora_B->weight, a.lora_A->forward(h.to(a.lora_A->weight.scalar_type())));
    at::Tensor term;
    if (a.options().use_dora()) {
      const at::Tensor m_scale = dora_scale(a);
      // PEFT: without dropout the base output (less its bias) is reused; with
      // dropout the base convolution of the dropped input, without bias.
      const at::Tensor base_no_bias = dropping ? base->convolve(h, base->weight, at::Tensor())
                                               : (bias.defined() ? out - bias.view({1, -1, 1, 1}) : out);
      term = (m_scale - 1) * base_no_bias + m_scale * low_rank * a.scale();
    } else {
      term = low_rank * a.scale();
    }
    result = result + term.to(out.scalar_type());
  }
  return result;
}

at::Tensor LoRAConv2dImpl::delta_weight(const std::string& name) const {
  const auto& a = adapter(name);
  if (a.options().use_dora()) throw PeftError("delta_weight: a DoRA adapter's merge is not a sum; use merge_adapter");
  return lora::conv_delta_weight(a.lora_A->weight, a.lora_B->weight, a.scale(), base->weight)
      .to(base->weight.scalar_type());
}

void LoRAConv2dImpl::merge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  auto& a = require_merged(name, false, "merge_adapter");
  at::Tensor norm;
  base->weight.copy_(lora::conv_merged_weight(base->weight, a.lora_A->weight, a.lora_B->weight, a.scale(),
                                              a.lora_magnitude_vector, &norm));
  a.merged_norm = norm;
  set_merged(name, true);
}

void LoRAConv2dImpl::unmerge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  auto& a = require_merged(name, true, "unmerge_adapter");
  base->weight.copy_(lora::conv_unmerged_weight(base->weight, a.lora_A->weight, a.lora_B->weight, a.scale(),
                                                a.lora_magnitude_vector, a.merged_norm));
  a.merged_norm = at::Tensor();
  set_merged(name, false);
}

void LoRAConv2dImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoRAConv2d"); }

}  // namespace d9d::peft
