#include <d9d/model_state/mapper/leaf/rename.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/layer.h>
#include <d9d/peft/lora/method.h>
#include <d9d/peft/module_tree.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/embedding.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>

#include <ATen/Parallel.h>

#include <fmt/format.h>

#include <cmath>
#include <limits>

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

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// Inverted dropout of a contiguous float CPU tensor: `x * mask`, the mask
/// 0 with probability p (resolution 2^-16) and 1/(1-p) otherwise. LibTorch's
/// CPU Bernoulli costs several times the LoRA path itself; this draws four
/// 16-bit uniforms per counter-based 64-bit hash, in parallel, seeded from
/// LibTorch's generator (so torch::manual_seed makes it reproducible).
at::Tensor fast_dropout(const at::Tensor& x, double p) {
  const uint64_t seed = static_cast<uint64_t>(at::randint(std::numeric_limits<int64_t>::max(), {1}, at::kLong).item<int64_t>());
  const uint32_t threshold = static_cast<uint32_t>(std::lround(p * 65536.0));
  const float keep_scale = static_cast<float>(1.0 / (1.0 - p));
  at::Tensor mask = at::empty(x.sizes(), x.options().requires_grad(false));
  float* m = mask.data_ptr<float>();
  const int64_t n = mask.numel();
  const int64_t words = (n + 3) / 4;
  at::parallel_for(0, words, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const uint64_t bits = splitmix64(seed ^ static_cast<uint64_t>(w) * 0xD1B54A32D192ED03ull);
      for (int64_t k = 0; k < 4 && 4 * w + k < n; ++k) {
        const uint32_t u = static_cast<uint32_t>((bits >> (16 * k)) & 0xFFFFu);
        m[4 * w + k] = u < threshold ? 0.0f : keep_scale;
      }
    }
  });
  return x * mask;
}

}  // namespace

// ----------------------------------------------------------- linear layer

LoRALinearImpl::LoRALinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoRALayerOptions& options)
    : d9d_base(std::move(base)), options_(options), scale_(options.scale()) {
  TORCH_CHECK(d9d_base, "LoRALinearImpl: the base layer is null");
  register_module("base", d9d_base);
  build(d9d_base->weight.size(1), d9d_base->weight.size(0));
}

LoRALinearImpl::LoRALinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoRALayerOptions& options)
    : torch_base(std::move(base)), options_(options), scale_(options.scale()) {
  TORCH_CHECK(torch_base, "LoRALinearImpl: the base layer is null");
  register_module("base", torch_base);
  build(torch_base->weight.size(1), torch_base->weight.size(0));
}

void LoRALinearImpl::build(int64_t in_features, int64_t out_features) {
  options_.validate();
  const auto& weight = base_weight();
  lora_A = register_module("lora_A", torch::nn::Linear(torch::nn::LinearOptions(in_features, options_.r).bias(false)));
  lora_B = register_module("lora_B", torch::nn::Linear(torch::nn::LinearOptions(options_.r, out_features).bias(false)));
  dropout = register_module("dropout", torch::nn::Dropout(options_.dropout));
  lora_A->to(weight.device(), weight.scalar_type());
  lora_B->to(weight.device(), weight.scalar_type());
  if (options_.use_dora) {
    lora_magnitude_vector =
        register_parameter("lora_magnitude_vector", at::empty({out_features}, weight.options()));
  }
  reset_parameters();
}

void LoRALinearImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  switch (options_.init) {
    case LoRAInit::Default:
      lora_A->reset_parameters();
      lora_B->weight.zero_();
      break;
    case LoRAInit::Gaussian:
      lora_A->weight.normal_(0.0, 1.0 / static_cast<double>(options_.r));
      lora_B->weight.zero_();
      break;
    case LoRAInit::Random:
      lora_A->reset_parameters();
      lora_B->reset_parameters();
      break;
  }
  if (options_.use_dora) reset_magnitude();
}

void LoRALinearImpl::reset_magnitude() {
  TORCH_CHECK(options_.use_dora, "reset_magnitude: this LoRA layer does not use DoRA");
  torch::NoGradGuard no_grad;
  const auto merged = base_weight() + scale_ * lora_B->weight.mm(lora_A->weight);
  lora_magnitude_vector.copy_(at::linalg_vector_norm(merged, 2, {1}).to(lora_magnitude_vector.scalar_type()));
}

const at::Tensor& LoRALinearImpl::base_weight() const { return d9d_base ? d9d_base->weight : torch_base->weight; }

const at::Tensor& LoRALinearImpl::base_bias() const { return d9d_base ? d9d_base->bias : torch_base->bias; }

std::shared_ptr<torch::nn::Module> LoRALinearImpl::base() const {
  if (d9d_base) return d9d_base;
  return torch_base;
}

std::vector<std::string> LoRALinearImpl::fresh_state_keys() const {
  std::vector<std::string> keys{"lora_A.weight", "lora_B.weight"};
  if (options_.use_dora) keys.push_back("lora_magnitude_vector");
  return keys;
}

at::Tensor LoRALinearImpl::dora_scale() const {
  // PEFT detaches the norm: the magnitude learns the scale, B and A the direction.
  at::Tensor norm;
  {
    torch::NoGradGuard no_grad;
    norm = at::linalg_vector_norm(base_weight() + scale_ * lora_B->weight.mm(lora_A->weight), 2, {1});
  }
  return (lora_magnitude_vector / norm.to(lora_magnitude_vector.scalar_type())).view({1, -1});
}

at::Tensor LoRALinearImpl::forward(const at::Tensor& input) {
  const at::Tensor& weight = base_weight();
  const at::Tensor& bias = base_bias();
  const bool drop = options_.dropout > 0.0 && is_training();
  at::Tensor h = input;
  if (drop) {
    const bool fast = input.device().is_cpu() && input.scalar_type() == at::kFloat && input.is_contiguous();
    h = fast ? fast_dropout(input, options_.dropout) : dropout->forward(input);
  }
  if (options_.use_dora) {
    const at::Tensor out = torch::nn::functional::linear(input, weight, bias);
    const at::Tensor low_rank = lora_B->forward(lora_A->forward(h));
    const at::Tensor m_scale = dora_scale();
    // Without dropout the base output (less its bias) is reused, as PEFT does.
    const at::Tensor base_no_bias =
        drop ? torch::nn::functional::linear(h, weight) : (bias.defined() ? out - bias : out);
    return out + (m_scale - 1) * base_no_bias + m_scale * low_rank * scale_;
  }
  // base + scale * B(A(h)) on 2-D views, the low-rank product accumulated
  // into the base output in place (one addmm_) and the scale applied to the
  // small [tokens, r] intermediate rather than to the [tokens, out] result.
  const int64_t in_features = weight.size(1);
  const at::Tensor x2 = input.reshape({-1, in_features});
  const at::Tensor h2 = drop ? h.reshape({-1, in_features}) : x2;
  at::Tensor out = bias.defined() ? at::addmm(bias, x2, weight.t()) : at::mm(x2, weight.t());
  at::Tensor low = at::mm(h2, lora_A->weight.t());
  if (scale_ != 1.0) low.mul_(scale_);
  out.addmm_(low, lora_B->weight.t());
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = weight.size(0);
  return out.view(shape);
}

at::Tensor LoRALinearImpl::delta_weight() const { return lora_B->weight.mm(lora_A->weight) * scale_; }

void LoRALinearImpl::merge_into_base() {
  torch::NoGradGuard no_grad;
  const at::Tensor& weight = base_weight();
  if (options_.use_dora) {
    const at::Tensor merged = weight + scale_ * lora_B->weight.mm(lora_A->weight);
    const at::Tensor norm = at::linalg_vector_norm(merged, 2, {1});
    weight.copy_(merged * (lora_magnitude_vector / norm).view({-1, 1}));
    return;
  }
  weight.addmm_(lora_B->weight, lora_A->weight, /*beta=*/1.0, /*alpha=*/scale_);
}

void LoRALinearImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoRALinear(r=" << options_.r << ", alpha=" << options_.alpha
         << ", dropout=" << options_.dropout;
  if (options_.use_rslora) stream << ", rslora";
  if (options_.use_dora) stream << ", dora";
  stream << ")";
}

// -------------------------------------------------------- embedding layer

LoRAEmbeddingImpl::LoRAEmbeddingImpl(std::shared_ptr<d9d::nn::EmbeddingImpl> base_, const LoRALayerOptions& options)
    : base(std::move(base_)), options_(options), scale_(options.scale()) {
  TORCH_CHECK(base, "LoRAEmbeddingImpl: the base layer is null");
  options_.validate();
  if (options_.use_dora) throw PeftError("LoRA: DoRA is supported on linear layers only, not on embeddings");
  register_module("base", base);
  const auto& w = base->weight;
  lora_embedding_A = register_parameter("lora_embedding_A", at::empty({options_.r, w.size(0)}, w.options()));
  lora_embedding_B = register_parameter("lora_embedding_B", at::empty({w.size(1), options_.r}, w.options()));
  dropout = register_module("dropout", torch::nn::Dropout(options_.dropout));
  reset_parameters();
}

void LoRAEmbeddingImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  if (options_.init == LoRAInit::Random) {
    lora_embedding_A.normal_();
    lora_embedding_B.normal_();
  } else {
    lora_embedding_A.zero_();
    lora_embedding_B.normal_();
  }
}

at::Tensor LoRAEmbeddingImpl::forward(const at::Tensor& indices) {
  at::Tensor out = base->forward_base(indices);
  const auto& o = base->options;
  at::Tensor after_a = torch::nn::functional::detail::embedding(indices, lora_embedding_A.t(), o.padding_idx(),
                                                                o.max_norm(), o.norm_type(), o.scale_grad_by_freq(),
                                                                o.sparse());
  return out.add(after_a.matmul(lora_embedding_B.t()), scale_);
}

at::Tensor LoRAEmbeddingImpl::delta_weight() const { return lora_embedding_B.mm(lora_embedding_A).t() * scale_; }

void LoRAEmbeddingImpl::merge_into_base() {
  torch::NoGradGuard no_grad;
  base->weight.add_(lora_embedding_B.mm(lora_embedding_A).t(), scale_);
}

void LoRAEmbeddingImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::LoRAEmbedding(r=" << options_.r << ", alpha=" << options_.alpha << ")";
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
  struct Plan {
    ModuleEntry entry;
    std::shared_ptr<torch::nn::Module> wrapper;
    torch::nn::AnyModule any;
    d9d::nn::Adaptable* redirect = nullptr;
    std::shared_ptr<d9d::nn::LayerOverride> target;
    bool has_bias = false;
  };
  std::vector<Plan> plans;
  std::vector<std::string> matched;

  // Plan and build every wrapper first: a failure leaves the model untouched.
  for (auto& entry : list_modules(module, /*enter_adapters=*/false)) {
    const auto options = targeting.select(entry.name);
    if (!options) continue;
    matched.push_back("'" + entry.name + "'");
    if (auto linear = std::dynamic_pointer_cast<d9d::nn::LinearImpl>(entry.module)) {
      auto wrapper = std::make_shared<LoRALinearImpl>(linear, *options);
      plans.push_back({entry, wrapper, torch::nn::AnyModule(wrapper), linear.get(), wrapper, linear->bias.defined()});
    } else if (auto embedding = std::dynamic_pointer_cast<d9d::nn::EmbeddingImpl>(entry.module)) {
      if (options->use_dora) {
        throw PeftError(fmt::format("LoRA: cannot adapt '{}' with DoRA: DoRA is supported on linear layers only",
                                    entry.name));
      }
      auto wrapper = std::make_shared<LoRAEmbeddingImpl>(embedding, *options);
      plans.push_back({entry, wrapper, torch::nn::AnyModule(wrapper), embedding.get(), wrapper, false});
    } else if (auto plain = std::dynamic_pointer_cast<torch::nn::LinearImpl>(entry.module)) {
      if (!is_synced_container(*entry.parent)) {
        throw PeftError(fmt::format(
            "LoRA: cannot adapt '{}' (torch::nn::LinearImpl): its parent {} holds it as a typed member, and "
            "LibTorch's replace_module cannot redirect calls made through a member. Declare the layer as "
            "d9d::nn::Linear (same options, keys and numerics), or narrow {} to exclude it.",
            entry.name, type_name(*entry.parent), targeting.what));
      }
      auto wrapper = std::make_shared<LoRALinearImpl>(plain, *options);
      plans.push_back({entry, wrapper, torch::nn::AnyModule(wrapper), nullptr, nullptr, plain->bias.defined()});
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
    for (const auto& p : plan.wrapper->named_parameters(/*recurse=*/true)) {
      if (p.key().rfind("base.", 0) != 0) result.parameters_to_train.push_back(p.value());
    }
    result.load_state_mappers.push_back(std::make_shared<model_state::Rename>(name + ".weight", name + ".base.weight"));
    if (plan.has_bias) {
      result.load_state_mappers.push_back(std::make_shared<model_state::Rename>(name + ".bias", name + ".base.bias"));
    }
    replace_child(*plan.entry.parent, plan.entry.child_name, plan.any);
    if (plan.redirect) plan.redirect->set_override(plan.target);
  }
  return result;
}

size_t merge_lora(torch::nn::Module& module, const std::function<bool(const std::string&)>& selects) {
  size_t merged = 0;
  for (auto& entry : list_modules(module)) {
    if (!selects(entry.name)) continue;
    if (auto linear = std::dynamic_pointer_cast<LoRALinearImpl>(entry.module)) {
      linear->merge_into_base();
      if (linear->d9d_base) {
        linear->d9d_base->clear_override();
        replace_child(*entry.parent, entry.child_name, torch::nn::AnyModule(linear->d9d_base));
      } else {
        replace_child(*entry.parent, entry.child_name, torch::nn::AnyModule(linear->torch_base));
      }
      ++merged;
    } else if (auto embedding = std::dynamic_pointer_cast<LoRAEmbeddingImpl>(entry.module)) {
      embedding->merge_into_base();
      embedding->base->clear_override();
      replace_child(*entry.parent, entry.child_name, torch::nn::AnyModule(embedding->base));
      ++merged;
    }
  }
  return merged;
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
  merge_lora(module, [this](const std::string& name) { return std::regex_match(name, pattern_); });
}

}  // namespace d9d::peft
