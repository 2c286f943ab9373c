// The LoRA wrapper around a grouped expert layer.
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/grouped_linear.h>
#include <d9d/peft/lora/grouped_math.h>
#include <d9d/peft/mixed_batch.h>
#include "reset.h"

#include <ATen/Functions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <fmt/format.h>

#include <utility>
#include <vector>

#include "dropout.h"

namespace d9d::peft {

void refuse_grouped_dora(const std::string& layer) {
  throw PeftError(fmt::format("LoRA: DoRA (use_dora) is not supported on grouped expert layers, and '{}' is a "
                              "d9d::nn::GroupedLinear; use plain LoRA for the experts (use_dora false), or narrow "
                              "the pattern to exclude them",
                              layer));
}

LoRAGroupedLinearAdapterImpl::LoRAGroupedLinearAdapterImpl(int64_t groups, int64_t in_features, int64_t out_features,
                                                           const LoRAParameters& options, const at::TensorOptions& like)
    : options_(options), scale_(options.scale()) {
  options_.validate();
  lora_A = register_module("lora_A", d9d::nn::GroupedLinear(groups, in_features, options_.r()));
  lora_B = register_module("lora_B", d9d::nn::GroupedLinear(groups, options_.r(), out_features));
  dropout = register_module("dropout", torch::nn::Dropout(options_.dropout()));
  lora_A->to(like.device(), like.dtype().toScalarType());
  lora_B->to(like.device(), like.dtype().toScalarType());
}

void LoRAGroupedLinearAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoRAGroupedLinearAdapter(r=" << options_.r() << ", alpha=" << options_.alpha()
         << ", dropout=" << options_.dropout();
  if (options_.use_rslora()) stream << ", rslora";
  stream << ")";
}

at::Tensor LoRAGroupedLayer::forward(const at::Tensor&) {
  throw PeftError(
      "LoRAGroupedLinear: a grouped expert layer needs its group sizes; call forward(input, group_sizes), or call "
      "the d9d::nn::GroupedLinear it wraps as before (its calls reach this wrapper)");
}

LoRAGroupedLinearImpl::LoRAGroupedLinearImpl(std::shared_ptr<d9d::nn::GroupedLinearImpl> base_,
                                             const LoRAParameters& options, const std::string& adapter_name)
    : base(std::move(base_)) {
  if (!base) throw PeftError("LoRAGroupedLinearImpl: the base layer is null");
  register_module("base", base);
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void LoRAGroupedLinearImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  const LoRAParameters& params = lora_parameters(options);
  const auto& o = base->options;
  if (params.use_dora()) {
    refuse_grouped_dora(fmt::format("d9d::nn::GroupedLinear(groups={}, in_features={}, out_features={})", o.groups(),
                                    o.in_features(), o.out_features()));
  }
  auto adapter = std::make_shared<LoRAGroupedLinearAdapterImpl>(o.groups(), o.in_features(), o.out_features(), params,
                                                                base->weight.options());
  reset_adapter(*adapter);
  append(name, std::move(adapter));
}

void LoRAGroupedLinearImpl::relayout() {
  for (const char* child : {"lora_A", "lora_B", "dropout"}) {
    if (named_children().contains(child)) unregister_module(child);
  }
  clear_further_adapters();
  lora_A = d9d::nn::GroupedLinear(nullptr);
  lora_B = d9d::nn::GroupedLinear(nullptr);
  dropout = torch::nn::Dropout(nullptr);
  if (entries_.empty()) return;
  const auto& top = entries_.front().second;
  lora_A = register_module("lora_A", top->lora_A);
  lora_B = register_module("lora_B", top->lora_B);
  dropout = register_module("dropout", top->dropout);
  register_further_adapters();
}

void LoRAGroupedLinearImpl::reset_adapter(LoRAGroupedLinearAdapterImpl& a) {
  detail::reset_lora_factors(a);
}

void LoRAGroupedLinearImpl::reset_adapter_magnitude(LoRAGroupedLinearAdapterImpl&) {
  refuse_grouped_dora("this LoRAGroupedLinear");
}

torch::nn::AnyModule LoRAGroupedLinearImpl::unwrap() {
  base->clear_override();
  return torch::nn::AnyModule(base);
}

namespace {

/// What adapter `a` adds for `input` (rows sorted by group, `sizes` per group),
/// in `like`'s dtype: `scale * B(A(dropout(x)))`, group by group.
at::Tensor grouped_term(LoRAGroupedLinearAdapterImpl& a, const at::Tensor& input, c10::ArrayRef<int64_t> sizes,
                        bool training, at::ScalarType like) {
  at::Tensor h = input;
  const double p = a.options().dropout();
  if (p > 0.0 && training) {
    h = lora::cpu_dropout_applies(h) ? lora::CpuDropout::apply(h, p, 1.0 / (1.0 - p)) : a.dropout->forward(h);
  }
  const at::Tensor low = d9d::nn::grouped_linear(
      d9d::nn::grouped_linear(h.to(a.lora_A->weight.scalar_type()), a.lora_A->weight, sizes), a.lora_B->weight, sizes);
  return low.mul(a.scale()).to(like);
}

/// `x @ W_g + alpha * (h @ A_g) @ B_g` for the rows of each group g, into one
/// output: each group's low-rank product is accumulated into its rows of the
/// base product by one addmm_ (alpha carries the scale), so the term is never
/// a separate [tokens, out] tensor to scale and add. Returns the output and
/// `h @ A_g` per group ([tokens, r], which backward needs).
std::pair<at::Tensor, at::Tensor> fused_product(const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                c10::ArrayRef<int64_t> sizes, double alpha) {
  at::Tensor out = at::empty({x.size(0), weight.size(2)}, x.options());
  at::Tensor low = at::empty({x.size(0), lora_a.size(2)}, x.options());
  int64_t begin = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    const int64_t n = sizes[g];
    if (n == 0) continue;
    const auto e = static_cast<int64_t>(g);
    at::Tensor rows = out.narrow(0, begin, n);
    at::Tensor low_rows = low.narrow(0, begin, n);
    at::mm_out(rows, x.narrow(0, begin, n), weight.select(0, e));
    at::mm_out(low_rows, h.narrow(0, begin, n), lora_a.select(0, e));
    rows.addmm_(low_rows, lora_b.select(0, e), /*beta=*/1.0, /*alpha=*/alpha);
    begin += n;
  }
  return {out, low};
}

/// `fused_product` as one autograd node. Per-group autograd (split, a node
/// per product, cat) would cost a full-size [tokens, in] gradient for the
/// low-rank path plus the add and the concatenation that join it to the
/// base's; backward here writes each group's input gradient in place (the
/// base's product, then the low-rank one added by addmm_) and each expert's
/// A and B gradients straight into their slices. Inputs: x, h (the dropped
/// input, or x itself), weight [G, in, out], A [G, in, r], B [G, r, out].
struct GroupedLoRAProduct : public torch::autograd::Function<GroupedLoRAProduct> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h,
                            const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const std::vector<int64_t>& sizes, double alpha) {
    auto [out, low] = fused_product(x, h, weight, lora_a, lora_b, sizes, alpha);
    ctx->save_for_backward({x, h, weight, lora_a, lora_b, low});
    ctx->saved_data["sizes"] = sizes;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["shared"] = h.is_same(x);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &h = saved[1], &weight = saved[2], &lora_a = saved[3], &lora_b = saved[4],
                     &low = saved[5];
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const bool shared = ctx->saved_data["shared"].toBool();
    const at::Tensor grad = grads[0].contiguous();
    at::Tensor dx, dh, dw, da, db, dlow;
    if (ctx->needs_input_grad(0)) dx = at::empty_like(x);
    if (!shared && ctx->needs_input_grad(1)) dh = at::empty_like(h);
    if (ctx->needs_input_grad(2)) dw = at::zeros_like(weight);
    if (ctx->needs_input_grad(3)) da = at::zeros_like(lora_a);
    if (ctx->needs_input_grad(4)) db = at::zeros_like(lora_b);
    if ((dx.defined() && shared) || dh.defined() || da.defined()) dlow = at::empty_like(low);
    int64_t begin = 0;
    for (size_t g = 0; g < sizes.size(); ++g) {
      const int64_t n = sizes[g];
      if (n == 0) continue;
      const auto e = static_cast<int64_t>(g);
      const at::Tensor grad_rows = grad.narrow(0, begin, n);
      const at::Tensor a_e = lora_a.select(0, e);
      at::Tensor dlow_rows;
      if (dlow.defined()) {
        dlow_rows = dlow.narrow(0, begin, n);
        dlow_rows.addmm_(grad_rows, lora_b.select(0, e).t(), /*beta=*/0.0, /*alpha=*/alpha);
      }
      if (db.defined()) db.select(0, e).addmm_(low.narrow(0, begin, n).t(), grad_rows, 0.0, alpha);
      if (da.defined()) da.select(0, e).addmm_(h.narrow(0, begin, n).t(), dlow_rows, 0.0, 1.0);
      if (dw.defined()) dw.select(0, e).addmm_(x.narrow(0, begin, n).t(), grad_rows, 0.0, 1.0);
      if (dx.defined()) {
        at::Tensor dx_rows = dx.narrow(0, begin, n);
        at::mm_out(dx_rows, grad_rows, weight.select(0, e).t());
        if (shared) dx_rows.addmm_(dlow_rows, a_e.t());
      }
      if (dh.defined()) {
        at::Tensor dh_rows = dh.narrow(0, begin, n);
        at::mm_out(dh_rows, dlow_rows, a_e.t());
      }
      begin += n;
    }
    return {dx, dh, dw, da, db, at::Tensor(), at::Tensor()};
  }
};

/// Base plus one adapter on the CPU (see `GroupedLoRAProduct`): the same
/// arithmetic as `base + grouped_term`, with a third of the full-size passes.
at::Tensor fused_forward(LoRAGroupedLinearAdapterImpl& a, const at::Tensor& input, const at::Tensor& weight,
                         const std::vector<int64_t>& sizes, bool training) {
  at::Tensor h = input;
  const double p = a.options().dropout();
  if (p > 0.0 && training) {
    h = lora::cpu_dropout_applies(h) ? lora::CpuDropout::apply(h, p, 1.0 / (1.0 - p)) : a.dropout->forward(h);
  }
  const at::Tensor& lora_a = a.lora_A->weight;
  const at::Tensor& lora_b = a.lora_B->weight;
  const bool grad = torch::GradMode::is_enabled() && (input.requires_grad() || h.requires_grad() ||
                                                      weight.requires_grad() || lora_a.requires_grad() ||
                                                      lora_b.requires_grad());
  if (!grad) return fused_product(input, h, weight, lora_a, lora_b, sizes, a.scale()).first;
  return GroupedLoRAProduct::apply(input, h, weight, lora_a, lora_b, sizes, a.scale());
}

}  // namespace

at::Tensor LoRAGroupedLinearImpl::forward(const at::Tensor& input, const at::Tensor& group_sizes) {
  const std::vector<int64_t> sizes = base->check_input(input, group_sizes);
  if (enabled_ && mixed_batch() == nullptr && active_.size() == 1 && !is_merged(active_.front()) &&
      input.is_cpu()) {
    LoRAGroupedLinearAdapterImpl& a = *find(active_.front());
    if (a.lora_A->weight.scalar_type() == input.scalar_type()) {
      return fused_forward(a, input, base->weight, sizes, is_training());
    }
  }
  at::Tensor out = d9d::nn::grouped_linear(input, base->weight, sizes);
  if (!enabled_) return out;
  if (mixed_batch() != nullptr) return forward_mixed(input, sizes, out);
  for (const auto& name : active_) {
    if (is_merged(name)) continue;
    out = out + grouped_term(*find(name), input, sizes, is_training(), out.scalar_type());
  }
  return out;
}

at::Tensor LoRAGroupedLinearImpl::forward_mixed(const at::Tensor& input, const std::vector<int64_t>& sizes,
                                                at::Tensor out) {
  // Rows are routed tokens: each adapter's rows keep their order (ascending),
  // so they are still sorted by group, and their group sizes are counted.
  check_mixed_batch_rows(input);
  check_mixed_batch_unmerged();
  const MixedBatch& batch = *mixed_batch();
  const auto held = batch.select([this](const std::string& name) { return find(name) != nullptr; }, input.device());
  if (held.segments.empty()) return out;
  const auto groups = static_cast<int64_t>(sizes.size());
  const at::Tensor group_of_row =
      at::repeat_interleave(at::arange(groups, at::TensorOptions().dtype(at::kLong)), at::tensor(sizes));
  const at::Tensor order_cpu = batch.order(at::kCPU);
  std::vector<at::Tensor> terms;
  int64_t begin = 0;
  for (const auto* segment : held.segments) {
    const int64_t rows = segment->end - segment->begin;
    const at::Tensor counts =
        at::bincount(group_of_row.index_select(0, order_cpu.slice(0, segment->begin, segment->end)), {}, groups);
    const std::vector<int64_t> segment_sizes(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + groups);
    const at::Tensor x = input.index_select(0, held.order.narrow(0, begin, rows));
    terms.push_back(grouped_term(*find(segment->adapter), x, segment_sizes, is_training(), out.scalar_type()));
    begin += rows;
  }
  return out.index_add_(0, held.order, terms.size() == 1 ? terms.front() : at::cat(terms));
}

at::Tensor LoRAGroupedLinearImpl::delta_weight(const std::string& name) const {
  const auto& a = adapter(name);
  return lora::grouped_delta_weight(a.lora_A->weight, a.lora_B->weight, a.scale(), base->weight)
      .to(base->weight.scalar_type());
}

void LoRAGroupedLinearImpl::merge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  auto& a = require_merged(name, false, "merge_adapter");
  lora::grouped_merge_in_place(base->weight, a.lora_A->weight, a.lora_B->weight, a.scale());
  set_merged(name, true);
}

void LoRAGroupedLinearImpl::unmerge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  auto& a = require_merged(name, true, "unmerge_adapter");
  lora::grouped_unmerge_in_place(base->weight, a.lora_A->weight, a.lora_B->weight, a.scale());
  set_merged(name, false);
}

void LoRAGroupedLinearImpl::pretty_print(std::ostream& stream) const {
  print_adapters(stream, "d9d::peft::LoRAGroupedLinear");
}

}  // namespace d9d::peft
