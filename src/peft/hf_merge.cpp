// Merging a Hugging Face PEFT adapter into a checkpoint on disk, without model code.
#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/io/source.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/merge.h>

#include <ATen/Functions.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

namespace d9d::peft::hf {

namespace fs = std::filesystem;
namespace ms = d9d::model_state;

namespace {

// The parts of an adapter key after the module path, as PEFT 0.21 writes them.
const std::string kLoraA = ".lora_A.weight";
const std::string kLoraB = ".lora_B.weight";
const std::string kMagnitude = ".lora_magnitude_vector";
const std::string kEmbeddingA = ".lora_embedding_A";
const std::string kEmbeddingB = ".lora_embedding_B";
const std::string* const kSuffixes[] = {&kLoraA, &kLoraB, &kMagnitude, &kEmbeddingA, &kEmbeddingB};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

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

enum class Kind { Linear, Dora, Embedding, DoraEmbedding };

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
  } else {
    r.kind = r.magnitude ? Kind::Dora : Kind::Linear;
  }
  const std::string a_name = embedding ? kEmbeddingA.substr(1) : kLoraA.substr(1);
  const std::string b_name = embedding ? kEmbeddingB.substr(1) : kLoraB.substr(1);
  if (!r.a || !r.b) {
    throw PeftError(fmt::format("the adapter has '{}' but no '{}{}.{}' (an incomplete adapter file)",
                                r.a ? r.a.key : r.b.key, kPeftKeyPrefix, module_path, r.a ? b_name : a_name));
  }

  const std::optional<LoRALayerOptions> options = config.select(module_path);
  if (!options) {
    throw PeftError(fmt::format("the adapter holds '{}' but adapter_config.json does not target '{}' "
                                "(target_modules/exclude_modules disagree with the weights)",
                                r.a.key, module_path));
  }
  if (options->use_dora != bool(r.magnitude)) {
    throw PeftError(options->use_dora
                        ? fmt::format("adapter_config.json sets use_dora but the adapter has no '{}{}{}'",
                                      kPeftKeyPrefix, module_path, kMagnitude)
                        : fmt::format("the adapter has '{}' but adapter_config.json does not set use_dora",
                                      r.magnitude.key));
  }

  for (const Part* p : {&r.a, &r.b}) {
    if (p->tensor.dim() != 2) {
      throw PeftError(fmt::format("'{}' has shape {}, expected a matrix", p->key, shape_str(p->tensor.sizes())));
    }
    if (!at::isFloatingType(p->tensor.scalar_type())) {
      throw PeftError(fmt::format("'{}' has dtype {}, expected a floating-point type", p->key,
                                  c10::toString(p->tensor.scalar_type())));
    }
  }
  const int64_t rank = r.a.tensor.size(0);
  if (rank != options->r) {
    throw PeftError(fmt::format("'{}' has rank {} (shape {}) but adapter_config.json gives r = {} for '{}' "
                                "(check r and rank_pattern)",
                                r.a.key, rank, shape_str(r.a.tensor.sizes()), options->r, module_path));
  }
  if (r.b.tensor.size(1) != rank) {
    throw PeftError(fmt::format("'{}' has shape {} but '{}' has rank {}: the adapter file is inconsistent", r.b.key,
                                shape_str(r.b.tensor.sizes()), r.a.key, rank));
  }

  // The base shape the adapter implies: [out, in] for a linear layer, [V, d] for an embedding.
  const std::vector<int64_t> implied = embedding ? std::vector<int64_t>{r.a.tensor.size(1), r.b.tensor.size(0)}
                                                 : std::vector<int64_t>{r.b.tensor.size(0), r.a.tensor.size(1)};
  if (base_shape.vec() != implied) {
    throw PeftError(fmt::format("'{}' has shape {} in the base checkpoint, but the adapter's '{}' {} and '{}' {} "
                                "need {} (wrong base model?)",
                                base_key, shape_str(base_shape), r.a.key, shape_str(r.a.tensor.sizes()), r.b.key,
                                shape_str(r.b.tensor.sizes()), shape_str(implied)));
  }
  // DoRA's magnitude: one per output row of a linear weight, one per column
  // (embedding dimension) of an embedding's.
  const int64_t magnitudes = embedding ? implied[1] : implied[0];
  if (r.magnitude && r.magnitude.tensor.sizes().vec() != std::vector<int64_t>{magnitudes}) {
    throw PeftError(fmt::format("'{}' has shape {}, but '{}' has {} {} (wrong base model?)", r.magnitude.key,
                                shape_str(r.magnitude.tensor.sizes()), base_key, magnitudes,
                                embedding ? "columns" : "rows"));
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
  const at::ScalarType compute = base_weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (compute == at::kFloat && !(std::abs(r.scale) <= std::numeric_limits<float>::max())) {
    throw PeftError(fmt::format("the merge scale of '{}' ({:g}: the adapter's alpha / r times --scale) does not fit "
                                "float32; pass a smaller --scale",
                                r.a.key, r.scale));
  }
  const at::Tensor w = base_weight.to(compute);
  const at::Tensor a = r.a.tensor.to(compute), b = r.b.tensor.to(compute);
  switch (r.kind) {
    case Kind::Linear:
      return w.addmm(b, a, /*beta=*/1.0, /*alpha=*/r.scale).to(base_weight.scalar_type());
    case Kind::Embedding:
      return w.add(b.mm(a).t(), r.scale).to(base_weight.scalar_type());
    case Kind::Dora: {
      const at::Tensor merged = w.addmm(b, a, 1.0, r.scale).to(at::kDouble);
      const at::Tensor norm = at::linalg_vector_norm(merged, 2, {1});
      const at::Tensor factor = r.magnitude.tensor.to(at::kDouble) / norm;
      return (merged * factor.view({-1, 1})).to(base_weight.scalar_type());
    }
    case Kind::DoraEmbedding: {
      const at::Tensor merged = w.add(b.mm(a).t(), r.scale).to(at::kDouble);
      const at::Tensor norm = at::linalg_vector_norm(merged, 2, {0});
      const at::Tensor factor = r.magnitude.tensor.to(at::kDouble) / norm;
      return (merged * factor.view({1, -1})).to(base_weight.scalar_type());
    }
  }
  throw std::logic_error("unreachable");
}

int64_t count_non_finite(const at::Tensor& t) {
  return t.numel() - at::isfinite(t).sum().item<int64_t>();
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

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ms::CheckpointError(fmt::format("{}: cannot open", path.string()));
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

/// A torch.save archive (a zip file) rather than safetensors.
bool is_zip_archive(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[2] = {0, 0};
  in.read(magic, 2);
  return magic[0] == 'P' && magic[1] == 'K';
}

bool same_file(const fs::path& a, const fs::path& b) {
  std::error_code ec;
  return fs::exists(a, ec) && fs::exists(b, ec) && fs::equivalent(a, b, ec);
}

/// Output files written under temporary names; removed again unless committed.
class PendingFiles {
 public:
  explicit PendingFiles(fs::path out_dir, bool created_dir) : dir_(std::move(out_dir)), created_dir_(created_dir) {}
  PendingFiles(const PendingFiles&) = delete;
  PendingFiles& operator=(const PendingFiles&) = delete;
  ~PendingFiles() {
    if (committed_) return;
    std::error_code ec;
    for (const auto& [partial, final_name] : files_) fs::remove(partial, ec);
    if (created_dir_) fs::remove(dir_, ec);  // only if still empty
  }
  /// The temporary path to write `name` to.
  fs::path add(const std::string& name) {
    fs::path partial = dir_ / fmt::format(".{}.d9d-partial-{}", name, ::getpid());
    files_.emplace_back(partial, dir_ / name);
    return partial;
  }
  /// Renames every file into place, in the order added (the index last).
  void commit() {
    for (const auto& [partial, final_name] : files_) {
      std::error_code ec;
      fs::rename(partial, final_name, ec);
      if (ec) {
        throw ms::CheckpointError(
            fmt::format("{}: cannot rename {} into place: {}", final_name.string(), partial.string(), ec.message()));
      }
    }
    committed_ = true;
  }

 private:
  fs::path dir_;
  bool created_dir_;
  std::vector<std::pair<fs::path, fs::path>> files_;
  bool committed_ = false;
};

}  // namespace

AdapterFiles read_adapter_files(const std::string& dir) {
  AdapterFiles files;
  files.dir = dir;
  const fs::path config_path = fs::path(dir) / "adapter_config.json";
  std::error_code ec;
  if (!fs::is_directory(dir, ec) || !fs::exists(config_path, ec)) {
    throw PeftError(fmt::format("{}: not an adapter directory: no adapter_config.json (a Hugging Face PEFT adapter "
                                "directory holds adapter_config.json and adapter_model.safetensors)",
                                dir));
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text(config_path));
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError(config_path.string(), fmt::format("not valid JSON: {}", e.what()));
  }
  files.config = parse_lora_config(j, config_path.string());
  fs::path weights = fs::path(dir) / "adapter_model.safetensors";
  if (!fs::exists(weights, ec) && fs::exists(fs::path(dir) / "adapter_model.bin", ec)) {
    weights = fs::path(dir) / "adapter_model.bin";
  }
  if (!fs::exists(weights, ec)) {
    throw PeftError(fmt::format("{}: no adapter_model.safetensors (nor adapter_model.bin) next to adapter_config.json",
                                dir));
  }
  files.weights_path = weights.string();
  const auto source = ms::open_checkpoint(files.weights_path);
  for (const auto& key : source->keys()) files.tensors.emplace(key, source->read(key));
  return files;
}

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

void merge_adapter_into_checkpoint(const std::string& base, const std::string& adapter_dir, const std::string& out,
                                   double scale, ms::ProgressCallback progress) {
  MergeOptions options;
  options.scale = scale;
  options.progress = std::move(progress);
  merge_adapter_into_checkpoint(base, adapter_dir, out, options);
}

void merge_adapter_into_checkpoint(const std::string& base, const std::string& adapter_dir, const std::string& out,
                                   const MergeOptions& options) {
  const double scale = options.scale;
  const ms::ProgressCallback& progress = options.progress;
  const AdapterFiles adapter = read_adapter_files(adapter_dir);
  const std::vector<std::string> modules = adapted_module_paths(adapter.tensors, adapter.weights_path);
  if (modules.empty()) throw PeftError(fmt::format("{}: the adapter holds no weights", adapter.weights_path));
  const ms::SourcePtr source = ms::open_checkpoint(base);

  // Check everything against the base before writing anything.
  std::map<std::string, Resolved> plan;  // base key -> what to merge into it
  for (const auto& module : modules) {
    const std::string key = module + ".weight";
    if (!source->contains(key)) {
      throw PeftError(fmt::format("adapter targets '{}' but the base checkpoint has no '{}' (wrong base model?); "
                                  "base: {}",
                                  module, key, source->describe()));
    }
    const at::Tensor weight = source->read(key);
    check_base_dtype(weight, key);
    const Resolved& r =
        plan.emplace(key, resolve(weight.sizes(), key, module, adapter.tensors, adapter.config, scale)).first->second;
    if (!options.allow_non_finite) check_adapter_finite(r, adapter.weights_path, key);
    source->release(key);
  }

  // The output layout follows the input's.
  const bool sharded = ends_with(source->describe(), ".index.json");
  std::map<std::string, std::vector<std::string>> by_location;
  for (const auto& key : source->keys()) by_location[source->location(key)].push_back(key);
  std::map<std::string, std::string> out_names;  // location -> output file name
  for (const auto& item : by_location) {
    out_names[item.first] = sharded ? fs::path(item.first).filename().string() : "model.safetensors";
  }
  const std::string index_name = sharded ? fs::path(source->describe()).filename().string() : "";

  // Never write where the base lies.
  const fs::path out_dir(out);
  std::vector<fs::path> inputs = {fs::path(base)};
  if (sharded) inputs.emplace_back(source->describe());
  for (const auto& item : by_location) inputs.emplace_back(item.first);
  std::error_code ec;
  for (const auto& input : inputs) {
    const fs::path holder = fs::is_directory(input, ec) ? input : input.parent_path();
    if (same_file(out_dir, holder.empty() ? fs::path(".") : holder)) {
      throw PeftError(fmt::format("the output directory '{}' is where the base checkpoint lies ('{}'): merging "
                                  "would overwrite the base; choose another --out directory",
                                  out, input.string()));
    }
  }
  if (fs::exists(out_dir, ec) && !fs::is_directory(out_dir, ec)) {
    throw PeftError(fmt::format("the output '{}' exists and is not a directory; --out names a directory", out));
  }
  // A checkpoint already in `out` that this one would not replace would confuse readers.
  if (fs::is_directory(out_dir, ec)) {
    std::set<std::string> written;
    for (const auto& item : out_names) written.insert(item.second);
    if (sharded) written.insert(index_name);
    std::set<std::string> stale;
    for (const auto& entry : fs::directory_iterator(out_dir, ec)) {
      const std::string name = entry.path().filename().string();
      if ((ends_with(name, ".safetensors") || ends_with(name, ".safetensors.index.json")) && !written.count(name)) {
        stale.insert("'" + name + "'");
      }
    }
    if (!stale.empty()) {
      throw PeftError(fmt::format("the output directory '{}' already holds {}, which this merge would not "
                                  "replace; use a new or empty directory",
                                  out, fmt::join(stale, ", ")));
    }
  }
  const bool created = !fs::exists(out_dir, ec);
  fs::create_directories(out_dir, ec);
  if (ec) throw ms::CheckpointError(fmt::format("{}: cannot create the output directory: {}", out, ec.message()));

  PendingFiles pending(out_dir, created);
  const auto start = std::chrono::steady_clock::now();
  ms::ProgressInfo info{"merge", 0, source->keys().size(), 0, 0, 0, false};
  for (const auto& key : source->keys()) info.bytes_total += source->nbytes(key);
  auto report = [&] {
    info.elapsed_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (progress) progress(info);
  };

  ms::SafetensorsIndex index;
  for (const auto& [location, keys] : by_location) {
    // A safetensors shard keeps its metadata; readers such as transformers want "format".
    std::map<std::string, std::string> metadata;
    if (!is_zip_archive(location)) metadata = ms::SafetensorsFile::open(location)->header().metadata;
    if (!metadata.count("format")) metadata["format"] = "pt";

    ms::StateDict shard;
    for (const auto& key : keys) {
      at::Tensor tensor = source->read(key);
      auto it = plan.find(key);
      if (it != plan.end()) {
        at::Tensor merged = compute_merged(tensor, it->second);
        if (!options.allow_non_finite) check_merged_finite(merged, tensor, key);
        tensor = std::move(merged);
      }
      info.bytes_done += source->nbytes(key);
      ++info.done;
      shard.emplace(key, std::move(tensor));
      index.weight_map.emplace(key, out_names.at(location));
      report();
    }
    ms::save_safetensors(pending.add(out_names.at(location)).string(), shard, metadata);
    shard.clear();
    for (const auto& key : keys) source->release(key);
  }
  if (sharded) {
    index.total_size = info.bytes_total;
    ms::write_file_atomically(pending.add(index_name).string(), ms::dump_safetensors_index(index));
  }
  pending.commit();
  info.finished = true;
  report();
}

}  // namespace d9d::peft::hf
