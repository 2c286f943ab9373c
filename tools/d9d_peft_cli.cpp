// d9d-peft: inspect Hugging Face PEFT adapters and checkpoints, merge an adapter into a checkpoint.
#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/io/source.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/combine.h>
#include <d9d/peft/hf/merge.h>

#include <CLI/CLI.hpp>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
namespace hf = d9d::peft::hf;

namespace {

constexpr size_t kKeysShown = 20;

std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

std::string dtype_str(at::ScalarType dtype) {
  try {
    return ms::safetensors_dtype_name(dtype);
  } catch (const std::exception&) {
    return c10::toString(dtype);
  }
}

/// 1234567 -> "1,234,567".
std::string grouped(uint64_t n) {
  std::string digits = std::to_string(n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string human_bytes(uint64_t n) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1000 && u < 4) {
    v /= 1000;
    ++u;
  }
  return u == 0 ? fmt::format("{} B", n) : fmt::format("{:.1f} {}", v, units[u]);
}

std::string selector_str(const hf::ModuleSelector& s) {
  if (s.regex) return fmt::format("regex \"{}\"", *s.regex);
  if (s.names.empty()) return "none";
  std::string out;
  for (const auto& name : s.names) out += (out.empty() ? "" : ", ") + name;
  return out;
}

template <typename T>
std::string patterns_str(const std::vector<std::pair<std::string, T>>& patterns) {
  if (patterns.empty()) return "none";
  std::string out;
  for (const auto& [key, value] : patterns) out += fmt::format("{}{}: {}", out.empty() ? "" : ", ", key, value);
  return out;
}

const char* init_str(d9d::peft::LoRAInit init) {
  switch (init) {
    case d9d::peft::LoRAInit::Default: return "default";
    case d9d::peft::LoRAInit::Gaussian: return "gaussian";
    case d9d::peft::LoRAInit::Random: return "false (random)";
  }
  return "?";
}

bool has_key(const hf::AdapterTensors& tensors, const std::string& path, const std::string& suffix) {
  return tensors.count(hf::kPeftKeyPrefix + path + suffix) || tensors.count(path + suffix);
}

/// Whether module `path`'s lora_A is a 4-D conv weight (PEFT's lora.Conv2d).
bool is_conv(const hf::AdapterTensors& tensors, const std::string& path) {
  for (const std::string& key : {hf::kPeftKeyPrefix + path + ".lora_A.weight", path + ".lora_A.weight"}) {
    auto it = tensors.find(key);
    if (it != tensors.end()) return it->second.dim() == 4;
  }
  return false;
}

void inspect_adapter(const std::string& dir) {
  const hf::AdapterFiles adapter = hf::read_adapter_files(dir);
  if (adapter.peft_type != "LORA") {
    // Another registered method: its config as written and its tensors.
    fmt::print("adapter: {}\n  {:<18} {}\n", dir, "peft_type:", adapter.peft_type);
    for (const auto& item : adapter.config.items()) {
      if (item.key() != "peft_type") fmt::print("  {:<18} {}\n", item.key() + ":", item.value().dump());
    }
    uint64_t count = 0, shared = 0;
    fmt::print("\ntensors ({}) in {}:\n", adapter.tensors.size(), adapter.weights_path);
    for (const auto& [key, tensor] : adapter.tensors) {
      fmt::print("  {}  {}  {}\n", key, dtype_str(tensor.scalar_type()), shape_str(tensor.sizes()));
      // Keys outside base_model.model. are state shared by every layer (VeRA's frozen projections), not trained.
      (key.rfind(hf::kPeftKeyPrefix, 0) == 0 ? count : shared) += static_cast<uint64_t>(tensor.numel());
    }
    fmt::print("\ntrainable parameters: {}\n", grouped(count));
    if (shared > 0) fmt::print("frozen shared values: {}\n", grouped(shared));
    return;
  }
  const hf::LoraConfig c = hf::parse_lora_config(adapter.config, adapter.config_path);
  fmt::print("adapter: {}\n", dir);
  fmt::print("  {:<18} LORA\n", "peft_type:");
  fmt::print("  {:<18} {}\n", "r:", c.r);
  fmt::print("  {:<18} {}\n", "lora_alpha:", c.lora_alpha);
  fmt::print("  {:<18} {}\n", "lora_dropout:", c.lora_dropout);
  fmt::print("  {:<18} {}\n", "use_rslora:", c.use_rslora ? "yes" : "no");
  fmt::print("  {:<18} {}\n", "use_dora:", c.use_dora ? "yes" : "no");
  fmt::print("  {:<18} {}\n", "init_lora_weights:", init_str(c.init));
  fmt::print("  {:<18} {}\n", "target_modules:", selector_str(c.target_modules));
  fmt::print("  {:<18} {}\n", "exclude_modules:", selector_str(c.exclude_modules));
  if (!c.target_parameters.empty()) {
    fmt::print("  {:<18} {}\n", "target_parameters:", fmt::join(c.target_parameters, ", "));
  }
  fmt::print("  {:<18} {}\n", "rank_pattern:", patterns_str(c.rank_pattern));
  fmt::print("  {:<18} {}\n", "alpha_pattern:", patterns_str(c.alpha_pattern));
  if (c.base_model_name_or_path) fmt::print("  {:<18} {}\n", "base_model_name_or_path:", *c.base_model_name_or_path);
  if (c.task_type) fmt::print("  {:<18} {}\n", "task_type:", *c.task_type);

  size_t width = 3;
  uint64_t params = 0;
  for (const auto& [key, tensor] : adapter.tensors) {
    width = std::max(width, key.size());
    params += static_cast<uint64_t>(tensor.numel());
  }
  fmt::print("\ntensors ({}) in {}:\n", adapter.tensors.size(), adapter.weights_path);
  fmt::print("  {:<{}}  {:<5}  {}\n", "key", width, "dtype", "shape");
  for (const auto& [key, tensor] : adapter.tensors) {
    fmt::print("  {:<{}}  {:<5}  {}\n", key, width, dtype_str(tensor.scalar_type()), shape_str(tensor.sizes()));
  }

  const std::vector<std::string> modules = hf::adapted_module_paths(adapter.tensors, adapter.weights_path);
  width = 6;
  for (const auto& m : modules) width = std::max(width, m.size());
  fmt::print("\nadapted modules: {}\n", modules.size());
  fmt::print("  {:<{}}  {:<9}  {:>4}  {:>6}  {}\n", "module", width, "kind", "r", "alpha", "scale");
  for (const auto& m : modules) {
    const bool dora = has_key(adapter.tensors, m, ".lora_magnitude_vector");
    const char* kind = has_key(adapter.tensors, m, ".lora_embedding_A") ? "embedding"
                       : is_conv(adapter.tensors, m)                    ? (dora ? "dora conv" : "conv")
                       : dora                                           ? "dora"
                                                                        : "lora";
    const auto options = c.select(m);
    if (!options) {
      fmt::print("  {:<{}}  {:<9}  (not targeted by adapter_config.json)\n", m, width, kind);
      continue;
    }
    fmt::print("  {:<{}}  {:<9}  {:>4}  {:>6}  {:.6g}\n", m, width, kind, options->r(), options->alpha(),
               options->scale());
  }
  fmt::print("\ntrainable parameters: {}\n", grouped(params));
}

void inspect_checkpoint(const std::string& path, bool all) {
  const ms::SourcePtr source = ms::open_checkpoint(path);
  const ms::KeySet keys = source->keys();
  struct DtypeCount {
    size_t tensors = 0;
    uint64_t bytes = 0;
  };
  std::map<std::string, DtypeCount> dtypes;
  std::vector<std::pair<std::string, at::Tensor>> shown;
  uint64_t total = 0, params = 0;
  std::set<std::string> files;
  for (const auto& key : keys) {
    const at::Tensor t = source->read_meta(key);  // shapes and dtypes: no data is read
    const uint64_t n = source->nbytes(key);
    auto& d = dtypes[dtype_str(t.scalar_type())];
    ++d.tensors;
    d.bytes += n;
    total += n;
    params += static_cast<uint64_t>(t.numel());
    files.insert(source->location(key));
    if (all || shown.size() < kKeysShown) shown.emplace_back(key, t);
  }
  fmt::print("checkpoint: {}\n", source->describe());
  if (files.size() > 1) fmt::print("  shards:     {}\n", files.size());
  fmt::print("  tensors:    {}\n", keys.size());
  fmt::print("  parameters: {}\n", grouped(params));
  fmt::print("  bytes:      {} ({})\n", grouped(total), human_bytes(total));
  fmt::print("\ndtypes:\n");
  for (const auto& [name, d] : dtypes) {
    fmt::print("  {:<5}  {:>6} tensors  {:>12}\n", name, d.tensors, human_bytes(d.bytes));
  }
  size_t width = 3;
  for (const auto& item : shown) width = std::max(width, item.first.size());
  fmt::print("\n{}:\n", shown.size() == keys.size() ? std::string("tensors")
                                                   : fmt::format("first {} of {} tensors (--all for all)",
                                                                 shown.size(), keys.size()));
  fmt::print("  {:<{}}  {:<5}  {}\n", "key", width, "dtype", "shape");
  for (const auto& [key, t] : shown) {
    fmt::print("  {:<{}}  {:<5}  {}\n", key, width, dtype_str(t.scalar_type()), shape_str(t.sizes()));
  }
}

void inspect(const std::string& path, bool all) {
  std::error_code ec;
  if (fs::is_directory(path, ec) && fs::exists(fs::path(path) / "adapter_config.json", ec)) {
    inspect_adapter(path);
  } else {
    inspect_checkpoint(path, all);
  }
}

void merge(const std::string& base, const std::string& adapter, const std::string& out, double scale,
           bool allow_non_finite) {
  hf::MergeOptions options;
  options.scale = scale;
  options.allow_non_finite = allow_non_finite;
  hf::merge_adapter_into_checkpoint(base, adapter, out, options);
  const ms::SourcePtr written = ms::open_checkpoint(out);
  fmt::print("merged {} into {} (scale {}): wrote {} tensors to {}\n", adapter, base, scale, written->keys().size(),
             written->describe());
}

void combine(const std::vector<std::string>& adapters, const std::vector<double>& weights, const std::string& out,
             d9d::peft::WeightedAdapterOptions options, const std::optional<uint64_t>& seed) {
  if (options.combination_type().rfind("dare", 0) == 0) {
    // Without --seed the masks are drawn from a fresh seed, printed so that the run can be repeated.
    const uint64_t used = seed ? *seed : (static_cast<uint64_t>(std::random_device{}()) << 32) | std::random_device{}();
    options.generator(at::make_generator<at::CPUGeneratorImpl>(used));
    if (!seed) fmt::print("DARE masks drawn from --seed {}\n", used);
  }
  const auto result = hf::combine_adapter_dirs(adapters, weights, out, options);
  fmt::print("combined {} adapters ({}, r = {}): wrote {} modules to {}\n", adapters.size(), result.combination_type,
             result.rank, result.modules, out);
}

int fail(const std::string& message) {
  std::fflush(stdout);
  std::cerr << "d9d-peft: error: " << message << std::endl;
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "d9d-peft: Hugging Face PEFT LoRA adapters without Python or model code.\n"
      "Inspect an adapter or a checkpoint, merge an adapter (LoRA, rsLoRA, DoRA, embeddings) into a checkpoint,\n"
      "or combine LoRA adapters into a new one."};
  app.name("d9d-peft");
  app.require_subcommand(1);
  app.footer(
      "Examples:\n"
      "  d9d-peft inspect adapters/my-lora\n"
      "  d9d-peft merge --base llama-7b --adapter adapters/my-lora --out llama-7b-merged\n"
      "  d9d-peft combine --adapter a --weight 0.7 --adapter b --weight 0.5 --type svd --out ab\n"
      "Run 'd9d-peft COMMAND --help' for a command's options.");

  std::string inspect_path;
  bool inspect_all = false;
  CLI::App* inspect_cmd = app.add_subcommand(
      "inspect", "Describe an adapter directory or a checkpoint");
  inspect_cmd->add_option("PATH", inspect_path, "adapter directory or checkpoint")->required();
  inspect_cmd->add_flag("--all", inspect_all, "list every tensor of a checkpoint (default: the first 20)");
  inspect_cmd->footer(
      "An adapter directory (it holds adapter_config.json): its config, its tensors, the adapted modules with\n"
      "their kind, rank, alpha and scale, and the trainable parameter count.\n"
      "A checkpoint (model.safetensors, a sharded directory or *.safetensors.index.json, a torch.save file):\n"
      "tensor count, parameters, bytes, dtypes, and the keys with dtype and shape.\n\n"
      "Examples:\n"
      "  d9d-peft inspect adapters/my-lora\n"
      "  d9d-peft inspect llama-7b/model.safetensors.index.json --all");

  std::string base, adapter, out;
  double scale = 1.0;
  CLI::App* merge_cmd = app.add_subcommand(
      "merge", "Merge a PEFT adapter (LoRA, rsLoRA, DoRA, embeddings) into a base checkpoint");
  merge_cmd->add_option("--base", base, "base checkpoint: file, directory, index or torch.save file")->required();
  merge_cmd->add_option("--adapter", adapter, "adapter directory (adapter_config.json + adapter_model.safetensors)")
      ->required();
  merge_cmd->add_option("--out", out, "output directory (not the base's own directory)")->required();
  merge_cmd->add_option("--scale", scale, "multiplies the adapter's delta (DoRA: its scale)")
      ->capture_default_str();
  bool allow_non_finite = false;
  merge_cmd->add_flag("--allow-non-finite", allow_non_finite,
                      "write merged weights even where they hold NaN or Inf (refused by default)");
  merge_cmd->footer(
      "Writes OUT/model.safetensors for a single-file or torch.save base, the same shard files and index for a\n"
      "sharded one. Every adapted module's weight is checked against the base first (\"wrong base model?\");\n"
      "then the base is streamed shard by shard, and the files appear in OUT only once all are written.\n"
      "NaN or Inf in the adapter, or a merged weight that overflows, is refused (--allow-non-finite).\n\n"
      "Examples:\n"
      "  d9d-peft merge --base llama-7b --adapter adapters/my-lora --out llama-7b-merged\n"
      "  d9d-peft merge --base model.pt --adapter my-lora --out merged --scale 0.5");

  std::vector<std::string> combine_adapters;
  std::vector<double> combine_weights;
  std::string combine_out, combine_type = "svd", majority_sign = "total";
  std::optional<int64_t> svd_rank;
  std::optional<double> density, svd_clamp;
  std::optional<uint64_t> seed;
  CLI::App* combine_cmd = app.add_subcommand(
      "combine", "Combine LoRA adapters into a new one (PEFT's add_weighted_adapter)");
  combine_cmd->add_option("--adapter", combine_adapters, "adapter directory; repeat, one per --weight")->required();
  combine_cmd->add_option("--weight", combine_weights, "the adapter's weight (may be negative); one per --adapter")
      ->required();
  combine_cmd->add_option("--out", combine_out, "output adapter directory")->required();
  combine_cmd->add_option("--type", combine_type,
                          "cat, linear, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, "
                          "magnitude_prune, magnitude_prune_svd")
      ->capture_default_str();
  combine_cmd->add_option("--svd-rank", svd_rank, "*svd types: the new rank (default: the largest input rank)");
  combine_cmd->add_option("--svd-clamp", svd_clamp, "*svd types: clamp the factors at this quantile, in [0, 1]");
  combine_cmd->add_option("--density", density, "ties, dare, magnitude_prune types: fraction kept, in (0, 1]");
  combine_cmd->add_option("--majority-sign", majority_sign, "ties types: total or frequency")->capture_default_str();
  bool svd_reduced = false;
  combine_cmd->add_flag("--svd-reduced", svd_reduced, "*svd types: reduced SVD (full_matrices=False)");
  combine_cmd->add_option("--seed", seed, "dare types: seed of the random masks (default: a fresh one, printed)");
  combine_cmd->footer(
      "Writes OUT/adapter_config.json and OUT/adapter_model.safetensors as PEFT's add_weighted_adapter followed by\n"
      "save_pretrained would: r = lora_alpha = the new rank, target_modules joined, the rest the first adapter's.\n\n"
      "Examples:\n"
      "  d9d-peft combine --adapter a --weight 0.7 --adapter b --weight 0.5 --type svd --svd-rank 8 --out ab\n"
      "  d9d-peft combine --adapter a --weight 1 --adapter b --weight 1 --type dare_ties --density 0.5 --seed 0 --out ab");

  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }

  try {
    if (*inspect_cmd) inspect(inspect_path, inspect_all);
    if (*merge_cmd) merge(base, adapter, out, scale, allow_non_finite);
    if (*combine_cmd) {
      auto options = d9d::peft::WeightedAdapterOptions()
                         .combination_type(combine_type)
                         .svd_rank(svd_rank)
                         .svd_clamp(svd_clamp)
                         .density(density)
                         .majority_sign_method(majority_sign)
                         .svd_full_matrices(!svd_reduced);
      combine(combine_adapters, combine_weights, combine_out, options, seed);
    }
  } catch (const c10::Error& e) {
    return fail(e.what_without_backtrace());
  } catch (const std::exception& e) {  // CheckpointError, ConfigError, PeftError and the rest
    return fail(e.what());
  }
  return 0;
}
