// Merging an adapter directory into a checkpoint on disk, without model
// code: the method's OfflineMerge, streamed shard by shard.
#include <d9d/model_state/io/atomic_file.h>
#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/io/source.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/merge.h>
#include <d9d/peft/registry.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include "../../model_state/io/io_checks.h"
#include "config_rules.h"

namespace d9d::peft::hf {

using detail::ends_with;

namespace fs = std::filesystem;
namespace ms = d9d::model_state;

namespace {

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

/// Runs `f`; a PeftError from it names the adapter's weights file (a
/// method's message names the keys, and may not know the file).
template <typename F>
auto naming_adapter_file(const AdapterFiles& adapter, F&& f) {
  try {
    return f();
  } catch (const PeftError& e) {
    const std::string what = e.what();
    if (what.find(adapter.weights_path) != std::string::npos) throw;
    throw PeftError(fmt::format("{}: {}", adapter.weights_path, what));
  }
}

}  // namespace

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
  const auto& method = method_for_peft_type(adapter.peft_type, adapter.config_path);
  if (!method.plan_offline_merge) {
    throw PeftError(fmt::format("{}: {} adapters cannot be merged into a checkpoint offline; load the adapter into "
                                "the model (hf::load_adapter) and merge it there",
                                adapter.config_path, adapter.peft_type));
  }
  const std::unique_ptr<OfflineMerge> plan = method.plan_offline_merge(adapter, scale);
  const ms::SourcePtr source = ms::open_checkpoint(base);

  // Check everything against the base before writing anything.
  std::set<std::string> targets;
  for (const auto& key : plan->target_keys(source->keys())) {
    if (!source->contains(key)) {
      throw PeftError(fmt::format("{}: the adapter changes '{}', which the base checkpoint does not hold (wrong "
                                  "base model?); base: {}",
                                  adapter.weights_path, key, source->describe()));
    }
    naming_adapter_file(adapter, [&] { plan->check(key, source->read(key), options.allow_non_finite); });
    source->release(key);
    targets.insert(key);
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
  // Each output gets its own plain file name in `out`, checked before
  // anything is written: a name from a hostile index must not reach outside
  // `out`, nor two outputs one file (the second would replace the first).
  std::map<std::string, std::string> writers;  // output name -> the input it comes from
  auto claim = [&](const std::string& name, const std::string& from) {
    ms::detail::check_file_name(name, source->describe(), fmt::format("the output file name for {}",
                                                                      ms::detail::printable(from)));
    auto [it, fresh] = writers.emplace(name, from);
    if (!fresh) {
      throw ms::CheckpointError(fmt::format(
          "{}: {} and {} would both be written to {} in {}; nothing was written. Give every shard of the base its "
          "own file name",
          source->describe(), ms::detail::printable(it->second), ms::detail::printable(from),
          ms::detail::printable(name), out));
    }
  };
  for (const auto& item : out_names) claim(item.second, item.first);
  if (sharded) claim(index_name, source->describe());

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
    // increment(ec): a directory that cannot be listed is an error below, not a filesystem_error.
    for (fs::directory_iterator it(out_dir, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string name = it->path().filename().string();
      if ((ends_with(name, ".safetensors") || ends_with(name, ".safetensors.index.json")) && !written.count(name)) {
        stale.insert("'" + name + "'");
      }
    }
    if (ec) throw ms::CheckpointError(fmt::format("{}: cannot list the output directory: {}", out, ec.message()));
    if (!stale.empty()) {
      throw PeftError(fmt::format("the output directory '{}' already holds {}, which this merge would not "
                                  "replace; use a new or empty directory",
                                  out, fmt::join(stale, ", ")));
    }
  }
  const bool created = !fs::exists(out_dir, ec);
  fs::create_directories(out_dir, ec);
  if (ec) throw ms::CheckpointError(fmt::format("{}: cannot create the output directory: {}", out, ec.message()));

  // Nothing appears in `out` until every file is complete; a failed merge
  // leaves no file behind, nor the directory if it made it.
  ms::PendingFiles pending(out, created);
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
      if (targets.count(key)) {
        tensor = naming_adapter_file(adapter, [&] { return plan->merge(key, tensor, options.allow_non_finite); });
      }
      info.bytes_done += source->nbytes(key);
      ++info.done;
      shard.emplace(key, std::move(tensor));
      index.weight_map.emplace(key, out_names.at(location));
      report();
    }
    ms::save_safetensors(pending.add(out_names.at(location)), shard, metadata);
    shard.clear();
    for (const auto& key : keys) source->release(key);
  }
  if (sharded) {
    index.total_size = info.bytes_total;
    ms::write_file_atomically(pending.add(index_name), ms::dump_safetensors_index(index));
  }
  pending.commit();
  info.finished = true;
  report();
}

}  // namespace d9d::peft::hf
