// LoRA's offline merge: an adapter file's tensors resolved per module,
// checked against the base, and merged with the in-model merge's arithmetic.
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/merge.h>
#include <d9d/peft/lora/conv_math.h>
#include <d9d/peft/lora/math.h>

#include <ATen/Functions.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <limits>
#include <map>
#include <set>
#include "../non_finite.h"
#include "config_rules.h"

namespace d9d::peft::hf {

using detail::ends_with;
using peft::detail::count_non_finite;

namespace {

// The parts of an adapter key after the module path, as PEFT 0.21 writes them.
const std::string kLoraA = ".lora_A.weight";
const std::string kLoraB = ".lora_B.weight";
const std::string kMagnitude = ".lora_magnitude_vector";
const std::string kEmbeddingA = ".lora_embedding_A";
const std::string kEmbeddingB = ".lora_embedding_B";
const std::string* const kSuffixes[] = {&kLoraA, &kLoraB, &kMagnitude, &kEmbeddingA, &kEmbeddingB};

std::string strip_prefix(const std::string& key) {
  return key.rfind(kPeftKeyPrefix, 0) == 0 ? key.substr(kPeftKeyPrefix.size()) : key;
}

std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

/// One adapter tensor with the key it has in the file (for messages).
struct Part {
  std::string key;
  at::Tensor tensor;
  explicit operator bool() const { return tensor.defined(); }
};

Part find_part(const AdapterTensors& adapter, const std::string& module_path, const std::string& suffix) {
  for (const std::string& key : {kPeftKeyPrefix + module_path + suffix, module_path + suffix}) {
    auto it = adapter.find(key);
    if (it != adapter.end()) return {key, it->second};
  }
  return {};
}

enum class Kind { Linear, Dora, Embedding, DoraEmbedding, Conv2d, DoraConv2d };

/// Everything needed to merge one module, checked against the base weight's shape.
struct Resolved {
  Kind kind;
  Part a, b, magnitude;
  double scale;
};

Resolved resolve(at::IntArrayRef base_shape, const std::string& base_key, const std::string& module_path,
                 const AdapterTensors& adapter, const LoraConfig& config, double extra_scale) {
  Resolved r;
  r.a = find_part(adapter, module_path, kLoraA);
  r.b = find_part(adapter, module_path, kLoraB);
  r.magnitude = find_part(adapter, module_path, kMagnitude);
  const Part ea = find_part(adapter, module_path, kEmbeddingA);
  const Part eb = find_part(adapter, module_path, kEmbeddingB);
  const bool linear = r.a || r.b, embedding = ea || eb;
  if (!linear && !embedding) {
    throw PeftError(fmt::format("the adapter has no LoRA weights for '{}' (expected '{}{}{}' and '{}{}{}', or "
                                "'{}{}{}' and '{}{}{}')",
                                module_path, kPeftKeyPrefix, module_path, kLoraA, kPeftKeyPrefix, module_path, kLoraB,
                                kPeftKeyPrefix, module_path, kEmbeddingA, kPeftKeyPrefix, module_path, kEmbeddingB));
  }
  if (linear && embedding) {
    throw PeftError(fmt::format("the adapter holds both linear (lora_A/lora_B) and embedding (lora_embedding_A/B) "
                                "weights for '{}'; a module is one or the other",
                                module_path));
  }
  if (embedding) {
    r.kind = r.magnitude ? Kind::DoraEmbedding : Kind::Embedding;
    r.a = ea;
    r.b = eb;
  } else if (r.a.tensor.dim() == 4) {
    // PEFT's lora.Conv2d: A [r, in, kh, kw], B [out, r, 1, 1].
    r.kind = r.magnitude ? Kind::DoraConv2d : Kind::Conv2d;
  } else {
    r.kind = r.magnitude ? Kind::Dora : Kind::Linear;
  }
  const bool conv = r.kind == Kind::Conv2d || r.kind == Kind::DoraConv2d;
  const std::string a_name = embedding ? kEmbeddingA.substr(1) : kLoraA.substr(1);
  const std::string b_name = embedding ? kEmbeddingB.substr(1) : kLoraB.substr(1);
  if (!r.a || !r.b) {
    throw PeftError(fmt::format("the adapter has '{}' but no '{}{}.{}' (an incomplete adapter file)",
                                r.a ? r.a.key : r.b.key, kPeftKeyPrefix, module_path, r.a ? b_name : a_name));
  }

  const std::optional<LoRAParameters> options = config.select(module_path);
  if (!options) {
    throw PeftError(fmt::format("the adapter holds '{}' but adapter_config.json does not target '{}' "
                                "(target_modules/exclude_modules disagree with the weights)",
                                r.a.key, module_path));
  }
  if (options->use_dora() != bool(r.magnitude)) {
    throw PeftError(options->use_dora()
                        ? fmt::format("adapter_config.json sets use_dora but the adapter has no '{}{}{}'",
                                      kPeftKeyPrefix, module_path, kMagnitude)
                        : fmt::format("the adapter has '{}' but adapter_config.json does not set use_dora",
                                      r.magnitude.key));
  }

  for (const Part* p : {&r.a, &r.b}) {
    if (p->tensor.dim() != (conv ? 4 : 2)) {
      throw PeftError(fmt::format("'{}' has shape {}, expected {}", p->key, shape_str(p->tensor.sizes()),
                                  conv ? fmt::format("a 4-D conv weight, as '{}' {}", r.a.key,
                                                     shape_str(r.a.tensor.sizes()))
                                       : std::string("a matrix")));
    }
    if (!at::isFloatingType(p->tensor.scalar_type())) {
      throw PeftError(fmt::format("'{}' has dtype {}, expected a floating-point type", p->key,
                                  c10::toString(p->tensor.scalar_type())));
    }
  }
  const int64_t rank = r.a.tensor.size(0);
  if (rank != options->r()) {
    throw PeftError(fmt::format("'{}' has rank {} (shape {}) but adapter_config.json gives r = {} for '{}' "
                                "(check r and rank_pattern)",
                                r.a.key, rank, shape_str(r.a.tensor.sizes()), options->r(), module_path));
  }
  if (r.b.tensor.size(1) != rank || (conv && (r.b.tensor.size(2) != 1 || r.b.tensor.size(3) != 1))) {
    throw PeftError(fmt::format("'{}' has shape {} but '{}' has rank {}: the adapter file is inconsistent", r.b.key,
                                shape_str(r.b.tensor.sizes()), r.a.key, rank));
  }

  // The base shape the adapter implies: [out, in] for a linear layer, [V, d]
  // for an embedding, [out, in, kh, kw] for a Conv2d.
  const std::vector<int64_t> implied =
      embedding ? std::vector<int64_t>{r.a.tensor.size(1), r.b.tensor.size(0)}
      : conv    ? std::vector<int64_t>{r.b.tensor.size(0), r.a.tensor.size(1), r.a.tensor.size(2), r.a.tensor.size(3)}
                : std::vector<int64_t>{r.b.tensor.size(0), r.a.tensor.size(1)};
  if (base_shape.vec() != implied) {
    throw PeftError(fmt::format("'{}' has shape {} in the base checkpoint, but the adapter's '{}' {} and '{}' {} "
                                "need {} (wrong base model?)",
                                base_key, shape_str(base_shape), r.a.key, shape_str(r.a.tensor.sizes()), r.b.key,
                                shape_str(r.b.tensor.sizes()), shape_str(implied)));
  }
  // DoRA's magnitude: one per output row of a linear weight, one per column
  // (embedding dimension) of an embedding's, one per output channel of a
  // Conv2d's, shaped [1, out, 1, 1] as PEFT writes it.
  const int64_t magnitudes = embedding ? implied[1] : implied[0];
  const std::vector<int64_t> magnitude_shape =
      conv ? std::vector<int64_t>{1, magnitudes, 1, 1} : std::vector<int64_t>{magnitudes};
  if (r.magnitude && r.magnitude.tensor.sizes().vec() != magnitude_shape) {
    throw PeftError(fmt::format("'{}' has shape {}, but '{}' has {} {} (wrong base model?)", r.magnitude.key,
                                shape_str(r.magnitude.tensor.sizes()), base_key, magnitudes,
                                embedding ? "columns" : conv ? "output channels" : "rows"));
  }
  r.scale = options->scale() * extra_scale;
  return r;
}

void check_base_dtype(const at::Tensor& base_weight, const std::string& base_key) {
  if (!at::isFloatingType(base_weight.scalar_type())) {
    throw PeftError(fmt::format("'{}' has dtype {} in the base checkpoint; LoRA merges into floating-point weights "
                                "only (a quantized base cannot be merged into)",
                                base_key, c10::toString(base_weight.scalar_type())));
  }
}

at::Tensor compute_merged(const at::Tensor& base_weight, const Resolved& r) {
  if (base_weight.scalar_type() != at::kDouble && !(std::abs(r.scale) <= std::numeric_limits<float>::max())) {
    throw PeftError(fmt::format("the merge scale of '{}' ({:g}: the adapter's alpha / r times --scale) does not fit "
                                "float32; pass a smaller --scale",
                                r.a.key, r.scale));
  }
  if (r.kind == Kind::Conv2d || r.kind == Kind::DoraConv2d) {
    return lora::conv_merged_weight(base_weight, r.a.tensor, r.b.tensor, r.scale, r.magnitude.tensor);
  }
  const bool embedding = r.kind == Kind::Embedding || r.kind == Kind::DoraEmbedding;
  return lora::merged_weight(embedding ? lora::LayerKind::Embedding : lora::LayerKind::Linear, base_weight,
                             r.a.tensor, r.b.tensor, r.scale, r.magnitude.tensor);
}

const char* const kAllowHint =
    "Nothing was written. Fix or retrain the adapter, or merge anyway with --allow-non-finite "
    "(MergeOptions::allow_non_finite)";

/// PEFT's safe_merge, before anything is computed: NaN or Inf in an adapter
/// tensor would land in the merged weight.
void check_adapter_finite(const Resolved& r, const std::string& source, const std::string& base_key) {
  for (const Part* p : {&r.a, &r.b, &r.magnitude}) {
    if (!*p) continue;
    if (const int64_t bad = count_non_finite(p->tensor)) {
      throw PeftError(fmt::format("{}: '{}' holds {} NaN or Inf value{} (of {}); merging it would write them into "
                                  "'{}'. {}",
                                  source, p->key, bad, bad == 1 ? "" : "s", p->tensor.numel(), base_key, kAllowHint));
    }
  }
}

/// After computing: finite inputs can still overflow the base's dtype.
void check_merged_finite(const at::Tensor& merged, const at::Tensor& base_weight, const std::string& base_key) {
  const int64_t bad = count_non_finite(merged);
  if (!bad) return;
  const bool base_bad = count_non_finite(base_weight) > 0;
  throw PeftError(fmt::format("merging into '{}' gives {} NaN or Inf value{} (of {}): {}. {}", base_key, bad,
                              bad == 1 ? "" : "s", merged.numel(),
                              base_bad ? "the base checkpoint's weight already holds NaN or Inf"
                                       : fmt::format("the sum overflows {}", c10::toString(merged.scalar_type())),
                              kAllowHint));
}

/// LoRA's plan: one resolved adapter per base key.
class LoraOfflineMerge : public OfflineMerge {
 public:
  LoraOfflineMerge(const AdapterFiles& files, double scale)
      : tensors_(files.tensors), config_(parse_lora_config(files.config, files.config_path)), scale_(scale),
        source_(files.weights_path) {
    if (!config_.target_parameters.empty()) {
      throw PeftError(fmt::format(
          "{}: target_parameters is set (LoRA on 3-D expert parameters), whose factors need the model's parameter "
          "layout, which an offline merge does not have; nothing was written. Load the adapter into the model "
          "(load_adapter), merge_peft, and save the model (save_model_state with moe_save_mapper)",
          files.config_path));
    }
    for (const auto& module : adapted_module_paths(tensors_, source_)) modules_.emplace(module + ".weight", module);
    if (modules_.empty()) throw PeftError(fmt::format("{}: the adapter holds no weights", source_));
  }
  std::vector<std::string> target_keys(const model_state::KeySet&) const override {
    std::vector<std::string> keys;
    for (const auto& item : modules_) keys.push_back(item.first);
    return keys;
  }
  void check(const std::string& key, const at::Tensor& base, bool allow_non_finite) const override {
    check_base_dtype(base, key);
    const Resolved r = resolve(base.sizes(), key, modules_.at(key), tensors_, config_, scale_);
    if (!allow_non_finite) check_adapter_finite(r, source_, key);
  }
  at::Tensor merge(const std::string& key, const at::Tensor& base, bool allow_non_finite) const override {
    const Resolved r = resolve(base.sizes(), key, modules_.at(key), tensors_, config_, scale_);
    at::Tensor merged = compute_merged(base, r);
    if (!allow_non_finite) check_merged_finite(merged, base, key);
    return merged;
  }

 private:
  AdapterTensors tensors_;
  LoraConfig config_;
  double scale_;
  std::string source_;
  std::map<std::string, std::string> modules_;  // base key -> module path
};

}  // namespace

std::vector<std::string> adapted_module_paths(const AdapterTensors& tensors, const std::string& source) {
  std::set<std::string> paths;
  for (const auto& item : tensors) {
    const std::string key = strip_prefix(item.first);
    bool known = false;
    for (const std::string* suffix : kSuffixes) {
      if (ends_with(key, *suffix) && key.size() > suffix->size()) {
        paths.insert(key.substr(0, key.size() - suffix->size()));
        known = true;
        break;
      }
    }
    if (!known) {
      throw PeftError(fmt::format("{}: '{}' is not a LoRA weight d9d-peft can merge (expected keys ending in "
                                  "lora_A.weight, lora_B.weight, lora_magnitude_vector, lora_embedding_A or "
                                  "lora_embedding_B)",
                                  source, item.first));
    }
  }
  return {paths.begin(), paths.end()};
}

at::Tensor merge_lora_weight(const at::Tensor& base_weight, const std::string& module_path,
                             const AdapterTensors& adapter, const LoraConfig& config, double extra_scale,
                             bool allow_non_finite) {
  const std::string base_key = module_path + ".weight";
  check_base_dtype(base_weight, base_key);
  const Resolved r = resolve(base_weight.sizes(), base_key, module_path, adapter, config, extra_scale);
  if (!allow_non_finite) check_adapter_finite(r, "<adapter>", base_key);
  at::Tensor merged = compute_merged(base_weight, r);
  if (!allow_non_finite) check_merged_finite(merged, base_weight, base_key);
  return merged;
}

std::unique_ptr<OfflineMerge> plan_lora_offline_merge(const AdapterFiles& files, double extra_scale) {
  return std::make_unique<LoraOfflineMerge>(files, extra_scale);
}

}  // namespace d9d::peft::hf
