#include <d9d/detail/torch_compat.h>
#include <d9d/model_state/mapper/leaf/rename.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/adapters.h>
#include <d9d/peft/lora/layer.h>
#include <d9d/peft/lora/method.h>
#include <d9d/peft/module_tree.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/embedding.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/container/moduledict.h>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <mutex>

namespace d9d::peft {

// ---------------------------------------------------------------- options

double LoRALayerOptions::scale() const {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

void LoRALayerOptions::validate() const {
  if (r < 1) throw ConfigError("r", fmt::format("must be >= 1, got {}", r));
  if (!(alpha > 0)) throw ConfigError("alpha", fmt::format("must be > 0, got {}", alpha));
  if (!(dropout >= 0.0 && dropout < 1.0)) throw ConfigError("dropout", fmt::format("must be in [0, 1), got {}", dropout));
}

// ---------------------------------------------------------------- dropout

namespace {

/// A seed from LibTorch's default CPU generator, so `torch::manual_seed`
/// makes masks reproducible (without allocating a tensor to draw it).
uint64_t draw_seed() { return d9d::detail::torch_compat::draw_cpu_random64(); }

uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}

// The mask kernel is compiled for AVX-512 and AVX2 as well as the baseline,
// picked at load time (GCC function multiversioning on x86-64): vectorised it
// is about 12x faster than one scalar hash per element.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define D9D_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define D9D_MULTIVERSION
#endif

/// `dst[i] = src[i] * keep`, or 0 where the hash of (seed, first + i) falls
/// below `threshold`. One 32-bit hash per element, no branches: vectorises.
D9D_MULTIVERSION
void mask_block(const float* __restrict src, float* __restrict dst, int64_t count, uint32_t first, uint32_t seed_a,
                uint32_t seed_b, uint32_t threshold, float keep) {
  for (int64_t i = 0; i < count; ++i) {
    uint32_t h = (first + static_cast<uint32_t>(i)) * 0x9E3779B1u + seed_a;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= seed_b;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    dst[i] = h < threshold ? 0.0f : src[i] * keep;
  }
}

/// `out = x * mask`, the mask a function of (seed, element index) alone: 0
/// with probability p (resolution 2^-32), `keep` otherwise. The same seed
/// gives the same mask, which is how backward gets it back without storing it.
at::Tensor masked(const at::Tensor& x_in, uint64_t seed, double p, float keep) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const double scaled = std::round(p * 4294967296.0);
  const uint32_t threshold = scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(scaled);
  const uint32_t seed_a = static_cast<uint32_t>(seed);
  const uint32_t seed_b = static_cast<uint32_t>(seed >> 32);
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    // Blocks never straddle a multiple of 2^32 elements, whose index bits
    // beyond 32 go into the seed.
    for (int64_t i = begin; i < end;) {
      const int64_t high = i >> 32;
      const int64_t stop = std::min<int64_t>(end, (high + 1) << 32);
      const uint32_t salt = high == 0 ? seed_b : seed_b ^ mix32(static_cast<uint32_t>(high));
      mask_block(src + i, dst + i, stop - i, static_cast<uint32_t>(i), seed_a, salt, threshold, keep);
      i = stop;
    }
  });
  return out;
}

/// Inverted dropout of a float CPU tensor as an autograd function: forward
/// writes the dropped input in one pass (no mask tensor), backward
/// regenerates the mask from the saved seed. LibTorch's CPU `bernoulli_`
/// costs several times the LoRA path itself.
struct CpuDropout : public torch::autograd::Function<CpuDropout> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, double p, double keep) {
    const uint64_t seed = draw_seed();
    ctx->saved_data["seed"] = static_cast<int64_t>(seed);
    ctx->saved_data["p"] = p;
    ctx->saved_data["keep"] = keep;
    return masked(x, seed, p, static_cast<float>(keep));
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto seed = static_cast<uint64_t>(ctx->saved_data["seed"].toInt());
    const double p = ctx->saved_data["p"].toDouble();
    const double keep = ctx->saved_data["keep"].toDouble();
    return {masked(grads[0], seed, p, static_cast<float>(keep)), at::Tensor(), at::Tensor()};
  }
};

bool cpu_dropout_applies(const at::Tensor& x) { return x.device().is_cpu() && x.scalar_type() == at::kFloat; }

}  // namespace

// --------------------------------------------------------------- adapters

void validate_adapter_name(const std::string& name) {
  const bool ok = !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
  });
  if (!ok) {
    throw PeftError(fmt::format("adapter name \"{}\" is not usable: it becomes part of state-dict keys, so use "
                                "letters, digits, '_' and '-' only (e.g. \"default\", \"task_b\")",
                                name));
  }
}

LoRALinearAdapterImpl::LoRALinearAdapterImpl(int64_t in_features, int64_t out_features,
                                             const LoRALayerOptions& options, const at::TensorOptions& like)
    : options_(options), scale_(options.scale()) {
  options_.validate();
  lora_A = register_module("lora_A", torch::nn::Linear(torch::nn::LinearOptions(in_features, options_.r).bias(false)));
  lora_B = register_module("lora_B", torch::nn::Linear(torch::nn::LinearOptions(options_.r, out_features).bias(false)));
  dropout = register_module("dropout", torch::nn::Dropout(options_.dropout));
  lora_A->to(like.device(), like.dtype().toScalarType());
  lora_B->to(like.device(), like.dtype().toScalarType());
  if (options_.use_dora) {
    lora_magnitude_vector = register_parameter("lora_magnitude_vector", at::empty({out_features}, like));
  }
}

void LoRALinearAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoRALinearAdapter(r=" << options_.r << ", alpha=" << options_.alpha
         << ", dropout=" << options_.dropout;
  if (options_.use_rslora) stream << ", rslora";
  if (options_.use_dora) stream << ", dora";
  stream << ")";
}

LoRAEmbeddingAdapterImpl::LoRAEmbeddingAdapterImpl(int64_t num_embeddings, int64_t dim,
                                                   const LoRALayerOptions& options, const at::TensorOptions& like)
    : options_(options), scale_(options.scale()) {
  options_.validate();
  lora_embedding_A = register_parameter("lora_embedding_A", at::empty({options_.r, num_embeddings}, like));
  lora_embedding_B = register_parameter("lora_embedding_B", at::empty({dim, options_.r}, like));
  // DoRA: one magnitude per embedding dimension (PEFT's DoraEmbeddingLayer).
  if (options_.use_dora) lora_magnitude_vector = register_parameter("lora_magnitude_vector", at::empty({dim}, like));
}

void LoRAEmbeddingAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoRAEmbeddingAdapter(r=" << options_.r << ", alpha=" << options_.alpha << ")";
}

namespace {

/// Unregisters the children and parameters a wrapper's adapter layout uses.
void clear_layout(torch::nn::Module& m, std::initializer_list<const char*> children) {
  const auto registered = m.named_children();
  for (const char* child : children) {
    if (registered.contains(child)) m.unregister_module(child);
  }
}

}  // namespace

// ------------------------------------------------------------ adapter set

template <typename Adapter>
std::vector<std::string> AdapterSet<Adapter>::names() const {
  std::vector<std::string> out;
  for (const auto& e : entries_) out.push_back(e.first);
  return out;
}

template <typename Adapter>
std::shared_ptr<Adapter> AdapterSet<Adapter>::find(const std::string& name) const {
  for (const auto& e : entries_) {
    if (e.first == name) return e.second;
  }
  return nullptr;
}

template <typename Adapter>
Adapter& AdapterSet<Adapter>::adapter(const std::string& name) const {
  if (auto a = find(name)) return *a;
  const auto held = names();
  throw PeftError(fmt::format("this LoRA layer has no adapter \"{}\"; it holds {}", name,
                              held.empty() ? std::string("none") : "\"" + fmt::format("{}", fmt::join(held, "\", \"")) + "\""));
}

template <typename Adapter>
Adapter& AdapterSet<Adapter>::pick(const std::string& name) const {
  if (!name.empty()) return adapter(name);
  if (entries_.empty()) throw PeftError("this LoRA layer holds no adapter (the last one was deleted)");
  return *entries_.front().second;
}

template <typename Adapter>
void AdapterSet<Adapter>::set_active_adapters(const std::vector<std::string>& names) {
  active_.clear();
  for (const auto& [name, adapter] : entries_) {
    const bool on = std::find(names.begin(), names.end(), name) != names.end();
    if (on) active_.push_back(name);
    for (auto& p : adapter->parameters()) p.requires_grad_(on);
  }
}

template <typename Adapter>
void AdapterSet<Adapter>::append(const std::string& name, std::shared_ptr<Adapter> adapter) {
  validate_adapter_name(name);
  if (find(name)) throw PeftError(fmt::format("this LoRA layer already holds an adapter \"{}\"", name));
  for (auto& p : adapter->parameters()) p.requires_grad_(false);
  entries_.emplace_back(name, std::move(adapter));
}

template <typename Adapter>
void AdapterSet<Adapter>::remove(const std::string& name) {
  adapter(name);  // throws if absent
  entries_.erase(std::find_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.first == name; }));
  active_.erase(std::remove(active_.begin(), active_.end(), name), active_.end());
}

template <typename Adapter>
std::vector<std::string> AdapterSet<Adapter>::adapter_state_keys() const {
  std::vector<std::string> keys;
  for (size_t i = 0; i < entries_.size(); ++i) {
    const std::string prefix = i == 0 ? "" : "adapters." + entries_[i].first + ".";
    for (const auto& p : entries_[i].second->named_parameters()) keys.push_back(prefix + p.key());
  }
  return keys;
}

template <typename Adapter>
std::shared_ptr<torch::nn::Module> AdapterSet<Adapter>::further_adapters() const {
  if (entries_.size() < 2) return nullptr;
  torch::nn::ModuleDict more;
  for (size_t i = 1; i < entries_.size(); ++i) {
    more->update(std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>{
        {entries_[i].first, entries_[i].second}});
  }
  return more.ptr();
}

template class AdapterSet<LoRALinearAdapterImpl>;
template class AdapterSet<LoRAEmbeddingAdapterImpl>;

// ----------------------------------------------------------- linear layer

LoRALinearImpl::LoRALinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoRALayerOptions& options,
                               const std::string& adapter_name)
    : d9d_base(std::move(base)) {
  TORCH_CHECK(d9d_base, "LoRALinearImpl: the base layer is null");
  register_module("base", d9d_base);
  init(options, adapter_name);
}

LoRALinearImpl::LoRALinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoRALayerOptions& options,
                               const std::string& adapter_name)
    : torch_base(std::move(base)) {
  TORCH_CHECK(torch_base, "LoRALinearImpl: the base layer is null");
  register_module("base", torch_base);
  init(options, adapter_name);
}

void LoRALinearImpl::init(const LoRALayerOptions& options, const std::string& adapter_name) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void LoRALinearImpl::add_adapter(const std::string& name, const LoRALayerOptions& options) {
  const auto& weight = base_weight();
  auto adapter = std::make_shared<LoRALinearAdapterImpl>(weight.size(1), weight.size(0), options, weight.options());
  reset_adapter(*adapter);
  append(name, std::move(adapter));
  relayout();
}

void LoRALinearImpl::delete_adapter(const std::string& name) {
  remove(name);
  relayout();
}

void LoRALinearImpl::relayout() {
  clear_layout(*this, {"lora_A", "lora_B", "dropout", "adapters"});
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
  if (top->options().use_dora) {
    lora_magnitude_vector = register_parameter("lora_magnitude_vector", top->lora_magnitude_vector,
                                               top->lora_magnitude_vector.requires_grad());
  }
  if (auto more = further_adapters()) register_module("adapters", more);
}

void LoRALinearImpl::reset_parameters() {
  for (auto& e : entries_) reset_adapter(*e.second);
}

void LoRALinearImpl::reset_adapter(LoRALinearAdapterImpl& a) {
  torch::NoGradGuard no_grad;
  switch (a.options().init) {
    case LoRAInit::Default:
      a.lora_A->reset_parameters();
      a.lora_B->weight.zero_();
      break;
    case LoRAInit::Gaussian:
      a.lora_A->weight.normal_(0.0, 1.0 / static_cast<double>(a.options().r));
      a.lora_B->weight.zero_();
      break;
    case LoRAInit::Random:
      a.lora_A->reset_parameters();
      a.lora_B->reset_parameters();
      break;
  }
  if (a.options().use_dora) reset_magnitude(a);
}

void LoRALinearImpl::reset_magnitude(const std::string& name) { reset_magnitude(pick(name)); }

void LoRALinearImpl::reset_magnitude(LoRALinearAdapterImpl& a) {
  if (!a.options().use_dora) throw PeftError("reset_magnitude: this LoRA adapter does not use DoRA");
  torch::NoGradGuard no_grad;
  const auto merged = base_weight() + a.scale() * a.lora_B->weight.mm(a.lora_A->weight);
  a.lora_magnitude_vector.copy_(at::linalg_vector_norm(merged, 2, {1}));
}

const at::Tensor& LoRALinearImpl::base_weight() const { return d9d_base ? d9d_base->weight : torch_base->weight; }

const at::Tensor& LoRALinearImpl::base_bias() const { return d9d_base ? d9d_base->bias : torch_base->bias; }

std::shared_ptr<torch::nn::Module> LoRALinearImpl::base() const {
  if (d9d_base) return d9d_base;
  return torch_base;
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
  if (!enabled_ || active_.empty()) return torch::nn::functional::linear(input, weight, bias);
  if (active_.size() > 1) return forward_general(input);
  LoRALinearAdapterImpl& a = *find(active_.front());
  if (a.options().use_dora || a.lora_A->weight.scalar_type() != input.scalar_type()) return forward_general(input);

  // base + scale * B(A(h)) on 2-D views: the low-rank product is accumulated
  // into the base output in place by one addmm_, whose alpha carries the scale.
  const double p = a.options().dropout;
  const int64_t in_features = weight.size(1);
  const at::Tensor x2 = input.reshape({-1, in_features});
  at::Tensor h2 = x2;
  double alpha = a.scale();
  if (p > 0.0 && is_training()) {
    if (cpu_dropout_applies(x2)) {
      // Kept inputs stay at 1x and 1/(1-p) joins addmm_'s alpha: one multiply
      // per input element fewer.
      h2 = CpuDropout::apply(x2, p, 1.0);
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
  // Several active adapters, DoRA, or adapters in another dtype than the
  // input (cast_adapter_dtype): each adapter adds its own term to the base
  // output, computed in its own dtype, as PEFT does.
  const at::Tensor& weight = base_weight();
  const at::Tensor& bias = base_bias();
  const at::Tensor out = torch::nn::functional::linear(input, weight, bias);
  at::Tensor result = out;
  for (const auto& name : active_) {
    LoRALinearAdapterImpl& a = *find(name);
    const double p = a.options().dropout;
    const bool dropping = p > 0.0 && is_training();
    at::Tensor h = input;
    if (dropping) h = cpu_dropout_applies(input) ? CpuDropout::apply(input, p, 1.0 / (1.0 - p)) : a.dropout->forward(input);
    const auto dtype = a.lora_A->weight.scalar_type();
    const at::Tensor low_rank = a.lora_B->forward(a.lora_A->forward(h.to(dtype)));
    at::Tensor term;
    if (a.options().use_dora) {
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

at::Tensor LoRALinearImpl::delta_weight(const std::string& name) const {
  const auto& a = pick(name);
  if (a.options().use_dora) throw PeftError("delta_weight: a DoRA adapter's merge is not a sum; use merge_into_base");
  return a.lora_B->weight.mm(a.lora_A->weight) * a.scale();
}

void LoRALinearImpl::merge_into_base(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = pick(name);
  const at::Tensor& weight = base_weight();
  if (a.options().use_dora) {
    const at::Tensor merged = weight + a.scale() * a.lora_B->weight.mm(a.lora_A->weight);
    const at::Tensor norm = at::linalg_vector_norm(merged, 2, {1});
    weight.copy_(merged * (a.lora_magnitude_vector / norm).view({-1, 1}));
    return;
  }
  if (a.lora_A->weight.scalar_type() == weight.scalar_type()) {
    weight.addmm_(a.lora_B->weight, a.lora_A->weight, /*beta=*/1.0, /*alpha=*/a.scale());
  } else {
    weight.add_((a.lora_B->weight.mm(a.lora_A->weight) * a.scale()).to(weight.scalar_type()));
  }
}

void LoRALinearImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoRALinear(";
  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& o = entries_[i].second->options();
    if (i) stream << "; ";
    if (entries_.size() > 1 || entries_[i].first != kDefaultAdapterName) {
      stream << entries_[i].first
             << (std::find(active_.begin(), active_.end(), entries_[i].first) != active_.end() ? "*" : "") << ": ";
    }
    stream << "r=" << o.r << ", alpha=" << o.alpha << ", dropout=" << o.dropout;
    if (o.use_rslora) stream << ", rslora";
    if (o.use_dora) stream << ", dora";
  }
  if (!enabled_) stream << "; disabled";
  stream << ")";
}

// -------------------------------------------------------- embedding layer

LoRAEmbeddingImpl::LoRAEmbeddingImpl(std::shared_ptr<d9d::nn::EmbeddingImpl> base_, const LoRALayerOptions& options,
                                     const std::string& adapter_name)
    : base(std::move(base_)) {
  TORCH_CHECK(base, "LoRAEmbeddingImpl: the base layer is null");
  register_module("base", base);
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void LoRAEmbeddingImpl::add_adapter(const std::string& name, const LoRALayerOptions& options) {
  const auto& w = base->weight;
  auto adapter = std::make_shared<LoRAEmbeddingAdapterImpl>(w.size(0), w.size(1), options, w.options());
  reset_adapter(*adapter);
  append(name, std::move(adapter));
  relayout();
}

void LoRAEmbeddingImpl::delete_adapter(const std::string& name) {
  remove(name);
  relayout();
}

void LoRAEmbeddingImpl::relayout() {
  clear_layout(*this, {"adapters"});
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
  if (top->options().use_dora) {
    lora_magnitude_vector = register_parameter("lora_magnitude_vector", top->lora_magnitude_vector,
                                               top->lora_magnitude_vector.requires_grad());
  }
  if (auto more = further_adapters()) register_module("adapters", more);
}

void LoRAEmbeddingImpl::reset_parameters() {
  for (auto& e : entries_) reset_adapter(*e.second);
}

void LoRAEmbeddingImpl::reset_adapter(LoRAEmbeddingAdapterImpl& a) {
  torch::NoGradGuard no_grad;
  if (a.options().init == LoRAInit::Random) {
    a.lora_embedding_A.normal_();
    a.lora_embedding_B.normal_();
  } else {
    a.lora_embedding_A.zero_();
    a.lora_embedding_B.normal_();
  }
  if (a.options().use_dora) reset_magnitude(a);
}

void LoRAEmbeddingImpl::reset_magnitude(const std::string& name) { reset_magnitude(pick(name)); }

void LoRAEmbeddingImpl::reset_magnitude(LoRAEmbeddingAdapterImpl& a) {
  if (!a.options().use_dora) throw PeftError("reset_magnitude: this LoRA adapter does not use DoRA");
  torch::NoGradGuard no_grad;
  a.lora_magnitude_vector.copy_(dora_norm(a));
}

at::Tensor LoRAEmbeddingImpl::dora_norm(const LoRAEmbeddingAdapterImpl& a) const {
  // The norm of each embedding dimension (column of the [V, d] weight) over the
  // vocabulary, of the weight with the adapter's delta added, as PEFT computes it.
  torch::NoGradGuard no_grad;
  const at::Tensor delta = a.lora_embedding_B.mm(a.lora_embedding_A).t();
  return at::linalg_vector_norm(base->weight + a.scale() * delta.to(base->weight.scalar_type()), 2, {0});
}

at::Tensor LoRAEmbeddingImpl::forward(const at::Tensor& indices) {
  at::Tensor out = base->forward_base(indices);
  if (!enabled_) return out;
  const auto& o = base->options;
  for (const auto& name : active_) {
    const LoRAEmbeddingAdapterImpl& a = *find(name);
    const at::Tensor after_a = torch::nn::functional::embedding(
        indices, a.lora_embedding_A.t(),
        torch::nn::functional::EmbeddingFuncOptions().padding_idx(o.padding_idx()).max_norm(o.max_norm())
            .norm_type(o.norm_type()).scale_grad_by_freq(o.scale_grad_by_freq()).sparse(o.sparse()));
    const at::Tensor term = after_a.matmul(a.lora_embedding_B.t());
    if (a.options().use_dora) {
      // PEFT: m / ||W + s·ΔW|| (norm detached) scales the base lookup and the
      // low-rank term alike.
      const at::Tensor m_scale = a.lora_magnitude_vector / dora_norm(a).to(a.lora_magnitude_vector.scalar_type());
      out = out + ((m_scale - 1) * out.to(m_scale.scalar_type()) + m_scale * term * a.scale()).to(out.scalar_type());
      continue;
    }
    out = term.scalar_type() == out.scalar_type() ? out.add(term, a.scale())
                                                  : out.add((term * a.scale()).to(out.scalar_type()));
  }
  return out;
}

at::Tensor LoRAEmbeddingImpl::delta_weight(const std::string& name) const {
  const auto& a = pick(name);
  if (a.options().use_dora) throw PeftError("delta_weight: a DoRA adapter's merge is not a sum; use merge_into_base");
  return a.lora_embedding_B.mm(a.lora_embedding_A).t() * a.scale();
}

void LoRAEmbeddingImpl::merge_into_base(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = pick(name);
  if (a.options().use_dora) {
    // W' = m / ||W + s·ΔW||_col · (W + s·ΔW): the sum is formed once and gives its own norm.
    const at::Tensor merged =
        base->weight + a.scale() * a.lora_embedding_B.mm(a.lora_embedding_A).t().to(base->weight.scalar_type());
    const at::Tensor norm = at::linalg_vector_norm(merged, 2, {0});
    const at::Tensor factor = a.lora_magnitude_vector / norm.to(a.lora_magnitude_vector.scalar_type());
    base->weight.copy_(merged * factor.to(base->weight.scalar_type()).view({1, -1}));
    return;
  }
  base->weight.add_(delta_weight(name).to(base->weight.scalar_type()));
}

void LoRAEmbeddingImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoRAEmbedding(";
  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& o = entries_[i].second->options();
    if (i) stream << "; ";
    if (entries_.size() > 1 || entries_[i].first != kDefaultAdapterName) {
      stream << entries_[i].first
             << (std::find(active_.begin(), active_.end(), entries_[i].first) != active_.end() ? "*" : "") << ": ";
    }
    stream << "r=" << o.r << ", alpha=" << o.alpha;
    if (o.use_rslora) stream << ", rslora";
    if (o.use_dora) stream << ", dora";
  }
  if (!enabled_) stream << "; disabled";
  stream << ")";
}

// ---------------------------------------------------------- inject, merge

namespace {

std::string example_names(torch::nn::Module& module) {
  std::vector<std::string> names;
  for (const auto& entry : list_modules(module, /*enter_adapters=*/false)) {
    if (entry.module->as<d9d::nn::LinearImpl>() || entry.module->as<torch::nn::LinearImpl>() ||
        entry.module->as<d9d::nn::EmbeddingImpl>()) {
      names.push_back("'" + entry.name + "'");
    }
    if (names.size() == 5) break;
  }
  if (names.empty()) return "the model has no adaptable layer outside existing adapters";
  return fmt::format("adaptable layers here are named like {}", fmt::join(names, ", "));
}

}  // namespace

PeftInjectionResult inject_lora(torch::nn::Module& module, const LoRATargeting& targeting) {
  const std::string& adapter = targeting.adapter_name;
  validate_adapter_name(adapter);
  const auto existing = lora_adapter_names(module);
  const auto active_now = active_lora_adapters(module);
  const bool active =
      existing.empty() || std::find(active_now.begin(), active_now.end(), adapter) != active_now.end();

  struct Plan {
    ModuleEntry entry;
    std::shared_ptr<torch::nn::Module> wrapper;  // a new wrapper, or the existing LoRA layer
    bool fresh = true;
    LoRALayerOptions options;
    torch::nn::AnyModule any;
    d9d::nn::Adaptable* redirect = nullptr;
    std::shared_ptr<d9d::nn::LayerOverride> target;
    bool has_bias = false;
  };
  std::vector<Plan> plans;
  std::vector<std::string> matched;

  auto check_free = [&](const auto& layer, const std::string& name) {
    if (layer.find(adapter)) {
      throw PeftError(fmt::format("LoRA: '{}' already holds an adapter \"{}\"; give the new adapter another "
                                  "name, or delete_adapter(\"{}\") first",
                                  name, adapter, adapter));
    }
  };

  // Plan and build every new wrapper first: a failure leaves the model untouched.
  for (auto& entry : list_modules(module, /*enter_adapters=*/false)) {
    const auto options = targeting.select(entry.name);
    if (!options) continue;
    matched.push_back("'" + entry.name + "'");
    if (auto lora = std::dynamic_pointer_cast<LoRALinearImpl>(entry.module)) {
      check_free(*lora, entry.name);
      options->validate();
      plans.push_back({entry, lora, false, *options, torch::nn::AnyModule(), nullptr, nullptr, false});
    } else if (auto lora_embedding = std::dynamic_pointer_cast<LoRAEmbeddingImpl>(entry.module)) {
      check_free(*lora_embedding, entry.name);
      options->validate();
      plans.push_back({entry, lora_embedding, false, *options, torch::nn::AnyModule(), nullptr, nullptr, false});
    } else if (auto linear = std::dynamic_pointer_cast<d9d::nn::LinearImpl>(entry.module)) {
      auto wrapper = std::make_shared<LoRALinearImpl>(linear, *options, adapter);
      plans.push_back(
          {entry, wrapper, true, *options, torch::nn::AnyModule(wrapper), linear.get(), wrapper, linear->bias.defined()});
    } else if (auto embedding = std::dynamic_pointer_cast<d9d::nn::EmbeddingImpl>(entry.module)) {
      auto wrapper = std::make_shared<LoRAEmbeddingImpl>(embedding, *options, adapter);
      plans.push_back({entry, wrapper, true, *options, torch::nn::AnyModule(wrapper), embedding.get(), wrapper, false});
    } else if (auto plain = std::dynamic_pointer_cast<torch::nn::LinearImpl>(entry.module)) {
      if (!is_synced_container(*entry.parent)) {
        throw PeftError(fmt::format(
            "LoRA: cannot adapt '{}' (torch::nn::LinearImpl): its parent {} holds it as a typed member, and "
            "LibTorch's replace_module cannot redirect calls made through a member. Declare the layer as "
            "d9d::nn::Linear (same options, keys and numerics), or narrow {} to exclude it.",
            entry.name, type_name(*entry.parent), targeting.what));
      }
      auto wrapper = std::make_shared<LoRALinearImpl>(plain, *options, adapter);
      plans.push_back(
          {entry, wrapper, true, *options, torch::nn::AnyModule(wrapper), nullptr, nullptr, plain->bias.defined()});
    } else if (entry.module->children().empty()) {
      const bool torch_embedding = entry.module->name() == "torch::nn::EmbeddingImpl";
      throw PeftError(fmt::format(
          "LoRA: {} matches '{}' of type {}, which LoRA cannot adapt (it adapts d9d::nn::Linear, "
          "d9d::nn::Embedding, and torch::nn::Linear inside Sequential, ModuleList or ModuleDict). {}",
          targeting.what, entry.name, type_name(*entry.module),
          torch_embedding ? "Declare the layer as d9d::nn::Embedding (same options, keys and numerics)."
                          : "Narrow the pattern to exclude it."));
    }
  }
  if (plans.empty()) {
    if (matched.empty()) {
      throw PeftError(fmt::format("LoRA: {} matches no module; {}, and {}", targeting.what, targeting.hint,
                                  example_names(module)));
    }
    throw PeftError(fmt::format("LoRA: {} matches {} but none is a layer LoRA can adapt; {}", targeting.what,
                                fmt::join(matched, ", "), example_names(module)));
  }

  PeftInjectionResult result;
  for (auto& plan : plans) {
    const auto& name = plan.entry.name;
    auto* linear = plan.wrapper->as<LoRALinearImpl>();
    auto* embedding = plan.wrapper->as<LoRAEmbeddingImpl>();
    std::vector<std::string> now_active;
    if (plan.fresh) {
      result.load_state_mappers.push_back(
          std::make_shared<model_state::Rename>(name + ".weight", name + ".base.weight"));
      if (plan.has_bias) {
        result.load_state_mappers.push_back(
            std::make_shared<model_state::Rename>(name + ".bias", name + ".base.bias"));
      }
      replace_child(*plan.entry.parent, plan.entry.child_name, plan.any);
      if (plan.redirect) plan.redirect->set_override(plan.target);
    } else {
      if (linear) linear->add_adapter(adapter, plan.options);
      else embedding->add_adapter(adapter, plan.options);
    }
    // The layer's active set is the model's active set (plus this adapter
    // when it is active), restricted to what the layer holds.
    // A new wrapper or adapter starts in the mode of the layer it adapts
    // (LibTorch modules start in training mode): injecting into a model in
    // eval mode must not switch dropout on.
    plan.wrapper->train(plan.entry.module->is_training());
    now_active = active_now;
    if (active) now_active.push_back(adapter);
    if (linear) linear->set_active_adapters(now_active);
    else embedding->set_active_adapters(now_active);
    if (active) {
      torch::nn::Module& added = linear ? static_cast<torch::nn::Module&>(linear->adapter(adapter))
                                        : static_cast<torch::nn::Module&>(embedding->adapter(adapter));
      for (const auto& p : added.parameters()) result.parameters_to_train.push_back(p);
    }
  }
  return result;
}

// ----------------------------------------------------------------- method

LoRA::LoRA(LoRAConfig config) : PeftMethod(std::move(config)) {
  validate(config_);
  pattern_ = std::regex(config_.module_name_pattern, std::regex::ECMAScript);
}

PeftInjectionResult LoRA::inject(torch::nn::Module& module) {
  LoRATargeting targeting;
  targeting.what = fmt::format("module_name_pattern \"{}\"", config_.module_name_pattern);
  targeting.hint = "it must match the whole qualified name";
  const LoRALayerOptions options(config_.params);
  targeting.select = [this, options](const std::string& name) -> std::optional<LoRALayerOptions> {
    if (std::regex_match(name, pattern_)) return options;
    return std::nullopt;
  };
  return inject_lora(module, targeting);
}

void LoRA::merge(torch::nn::Module& module) {
  merge_lora(
      module, [this](const std::string& name) { return std::regex_match(name, pattern_); }, kDefaultAdapterName);
}

}  // namespace d9d::peft
