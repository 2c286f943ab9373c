// The LoRA wrapper around an embedding.
#include <d9d/detail/torch_compat.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/embedding.h>
#include <d9d/peft/lora/math.h>
#include <d9d/peft/mixed_batch.h>

#include <fmt/format.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/embedding.h>

#include <algorithm>

namespace d9d::peft {

LoRAEmbeddingAdapterImpl::LoRAEmbeddingAdapterImpl(int64_t num_embeddings, int64_t dim, const LoRAParameters& options,
                                                   const at::TensorOptions& like)
    : options_(options), scale_(options.scale()) {
  options_.validate();
  lora_embedding_A = register_parameter("lora_embedding_A", at::empty({options_.r(), num_embeddings}, like));
  lora_embedding_B = register_parameter("lora_embedding_B", at::empty({dim, options_.r()}, like));
  // DoRA: one magnitude per embedding dimension (PEFT's DoraEmbeddingLayer).
  if (options_.use_dora()) lora_magnitude_vector = register_parameter("lora_magnitude_vector", at::empty({dim}, like));
}

void LoRAEmbeddingAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoRAEmbeddingAdapter(r=" << options_.r() << ", alpha=" << options_.alpha() << ")";
}

LoRAEmbeddingImpl::LoRAEmbeddingImpl(std::shared_ptr<d9d::nn::EmbeddingImpl> base_, const LoRAParameters& options,
                                     const std::string& adapter_name)
    : base(std::move(base_)) {
  if (!base) throw PeftError("LoRAEmbeddingImpl: the base layer is null");
  register_module("base", base);
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void LoRAEmbeddingImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  const auto& w = base->weight;
  auto adapter =
      std::make_shared<LoRAEmbeddingAdapterImpl>(w.size(0), w.size(1), lora_parameters(options), w.options());
  reset_adapter(*adapter);
  append(name, std::move(adapter));
}

void LoRAEmbeddingImpl::relayout() {
  clear_further_adapters();
  for (const char* p : {"lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}) {
    d9d::detail::torch_compat::unregister_parameter(*this, p);
  }
  lora_embedding_A = at::Tensor();
  lora_embedding_B = at::Tensor();
  lora_magnitude_vector = at::Tensor();
  if (entries_.empty()) return;
  const auto& top = entries_.front().second;
  lora_embedding_A =
      register_parameter("lora_embedding_A", top->lora_embedding_A, top->lora_embedding_A.requires_grad());
  lora_embedding_B =
      register_parameter("lora_embedding_B", top->lora_embedding_B, top->lora_embedding_B.requires_grad());
  if (top->options().use_dora()) {
    lora_magnitude_vector = register_parameter("lora_magnitude_vector", top->lora_magnitude_vector,
                                               top->lora_magnitude_vector.requires_grad());
  }
  register_further_adapters();
}

void LoRAEmbeddingImpl::reset_adapter(LoRAEmbeddingAdapterImpl& a) {
  torch::NoGradGuard no_grad;
  if (init_changes_base(a.options().init())) {
    throw PeftError(fmt::format("the {} initialisation is for Linear layers; an embedding's LoRA starts as "
                                "\"default\" (exclude embeddings from the pattern, or use another initialisation)",
                                lora_init_name(a.options())));
  }
  if (a.options().init() == LoRAInit::Random) {
    a.lora_embedding_A.normal_();
    a.lora_embedding_B.normal_();
  } else {
    a.lora_embedding_A.zero_();
    a.lora_embedding_B.normal_();
  }
  if (a.options().use_dora()) reset_adapter_magnitude(a);
}

void LoRAEmbeddingImpl::reset_adapter_magnitude(LoRAEmbeddingAdapterImpl& a) {
  torch::NoGradGuard no_grad;
  a.lora_magnitude_vector.copy_(lora::dora_norm(lora::LayerKind::Embedding, base->weight, a.lora_embedding_A,
                                                a.lora_embedding_B, a.scale()));
}

torch::nn::AnyModule LoRAEmbeddingImpl::unwrap() {
  base->clear_override();
  return torch::nn::AnyModule(base);
}

namespace {

/// What adapter `a` adds to the base lookup `out` of `indices` (in `out`'s dtype).
at::Tensor embedding_term(const LoRAEmbeddingAdapterImpl& a, const d9d::nn::EmbeddingImpl& base,
                          const at::Tensor& indices, const at::Tensor& out) {
  const auto& o = base.options;
  const at::Tensor after_a = torch::nn::functional::embedding(
      indices, a.lora_embedding_A.t(),
      torch::nn::functional::EmbeddingFuncOptions()
          .padding_idx(o.padding_idx())
          .max_norm(o.max_norm())
          .norm_type(o.norm_type())
          .scale_grad_by_freq(o.scale_grad_by_freq())
          .sparse(o.sparse()));
  const at::Tensor term = after_a.matmul(a.lora_embedding_B.t());
  if (a.options().use_dora()) {
    // PEFT: m / ||W + s·ΔW|| (norm detached) scales the base lookup and the
    // low-rank term alike.
    at::Tensor norm;
    {
      torch::NoGradGuard no_grad;
      norm = lora::dora_norm(lora::LayerKind::Embedding, base.weight, a.lora_embedding_A, a.lora_embedding_B,
                             a.scale());
    }
    const at::Tensor m_scale = a.lora_magnitude_vector / norm.to(a.lora_magnitude_vector.scalar_type());
    return ((m_scale - 1) * out.to(m_scale.scalar_type()) + m_scale * term * a.scale()).to(out.scalar_type());
  }
  return (term * a.scale()).to(out.scalar_type());
}

}  // namespace

at::Tensor LoRAEmbeddingImpl::forward(const at::Tensor& indices) {
  at::Tensor out = base->forward_base(indices);
  if (!enabled_) return out;
  if (mixed_batch() != nullptr) return forward_mixed(indices, out);
  for (const auto& name : active_) {
    if (is_merged(name)) continue;
    out = out + embedding_term(*find(name), *base, indices, out);
  }
  return out;
}

at::Tensor LoRAEmbeddingImpl::forward_mixed(const at::Tensor& indices, at::Tensor out) {
  check_mixed_batch_rows(indices);
  check_mixed_batch_unmerged();
  const auto held =
      mixed_batch()->select([this](const std::string& name) { return find(name) != nullptr; }, indices.device());
  if (held.segments.empty()) return out;
  const at::Tensor& order = held.order;
  const at::Tensor ids = indices.index_select(0, order);
  // DoRA rescales the base lookup too: only then are the base rows gathered.
  const bool dora = std::any_of(held.segments.begin(), held.segments.end(),
                                [this](const MixedBatch::Segment* s) { return find(s->adapter)->options().use_dora(); });
  const at::Tensor base_rows = dora ? out.index_select(0, order) : at::Tensor();
  std::vector<at::Tensor> terms;
  int64_t begin = 0;
  for (const auto* segment : held.segments) {
    const int64_t rows = segment->end - segment->begin;
    const auto& a = *find(segment->adapter);
    const at::Tensor segment_ids = ids.narrow(0, begin, rows);
    terms.push_back(a.options().use_dora() ? embedding_term(a, *base, segment_ids, base_rows.narrow(0, begin, rows))
                                           : embedding_term(a, *base, segment_ids, out));
    begin += rows;
  }
  out.index_add_(0, order, terms.size() == 1 ? terms.front() : at::cat(terms));
  return out;
}

at::Tensor LoRAEmbeddingImpl::delta_weight(const std::string& name) const {
  const auto& a = adapter(name);
  if (a.options().use_dora()) throw PeftError("delta_weight: a DoRA adapter's merge is not a sum; use merge_adapter");
  return lora::delta_weight(lora::LayerKind::Embedding, a.lora_embedding_A, a.lora_embedding_B, a.scale(),
                            base->weight)
      .to(base->weight.scalar_type());
}

void LoRAEmbeddingImpl::merge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  auto& a = require_merged(name, false, "merge_adapter");
  at::Tensor norm;
  lora::merge_in_place(lora::LayerKind::Embedding, base->weight, a.lora_embedding_A, a.lora_embedding_B, a.scale(),
                       a.lora_magnitude_vector, &norm);
  a.merged_norm = norm;
  set_merged(name, true);
}

void LoRAEmbeddingImpl::unmerge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  auto& a = require_merged(name, true, "unmerge_adapter");
  lora::unmerge_in_place(lora::LayerKind::Embedding, base->weight, a.lora_embedding_A, a.lora_embedding_B, a.scale(),
                         a.lora_magnitude_vector, a.merged_norm);
  a.merged_norm = at::Tensor();
  set_merged(name, false);
}

void LoRAEmbeddingImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoRAEmbedding"); }

}  // namespace d9d::peft
