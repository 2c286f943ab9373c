#include <d9d/model_state/io/atomic_file.h>
#include <d9d/model_state/io/stream.h>
#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>

#include <torch/nn/module.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "io_checks.h"

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <unistd.h>

namespace d9d::model_state {

namespace fs = std::filesystem;

// ---------------------------------------------------------------- progress

ProgressCallback stderr_progress() {
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  auto last = std::make_shared<double>(-1.0);
  return [tty, last](const ProgressInfo& p) {
    const double mb_done = p.bytes_done / 1e6, mb_total = p.bytes_total / 1e6;
    const double rate = p.elapsed_seconds > 0 ? mb_done / p.elapsed_seconds : 0.0;
    if (!tty) {
      if (p.finished && p.elapsed_seconds > 2.0) {
        std::fprintf(stderr, "[%s] %zu/%zu groups, %.1f MB in %.1f s (%.1f MB/s)\n", p.stage.c_str(), p.done, p.total,
                     mb_done, p.elapsed_seconds, rate);
      }
      return;
    }
    if (!p.finished && p.elapsed_seconds - *last < 0.1) return;
    *last = p.elapsed_seconds;
    const double eta = rate > 0 ? (mb_total - mb_done) / rate : 0.0;
    std::fprintf(stderr, "\r[%s] %zu/%zu groups, %.1f/%.1f MB, %.1f MB/s, ETA %.0f s   ", p.stage.c_str(), p.done,
                 p.total, mb_done, mb_total, rate, eta);
    if (p.finished) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  };
}

namespace {

struct Clock {
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
};

// An undefined tensor holds no bytes (save_safetensors then names its key).
uint64_t nbytes_of(const at::Tensor& t) {
  return t.defined() ? static_cast<uint64_t>(t.numel()) * t.element_size() : 0;
}

}  // namespace

// ----------------------------------------------------------------- reading

void read_model_state(const StateSource& source, const ModelStateMapper& mapper,
                      const std::function<void(StateDict)>& consume, const ProgressCallback& progress) {
  const StateGroups declared = mapper.state_dependency_groups();
  std::vector<StateGroup> groups(declared.begin(), declared.end());
  std::stable_sort(groups.begin(), groups.end(), [&](const StateGroup& a, const StateGroup& b) {
    auto where = [&](const StateGroup& g) {
      return g.inputs.empty() || !source.contains(*g.inputs.begin()) ? std::string()
                                                                     : source.location(*g.inputs.begin());
    };
    return where(a) < where(b);
  });
  uint64_t total = 0;
  for (const auto& group : groups) {
    for (const auto& key : group.inputs) {
      if (!source.contains(key)) {
        throw CheckpointError(fmt::format("{}: no tensor '{}' (the mapper reads it for {})", source.describe(), key,
                                          format_keys(group.outputs)));
      }
      total += source.nbytes(key);
    }
  }
  Clock clock;
  ProgressInfo info{"read", 0, groups.size(), 0, total, 0, false};
  for (const auto& group : groups) {
    StateDict inputs;
    for (const auto& key : group.inputs) {
      inputs.emplace(key, source.read_view(key));
      info.bytes_done += source.nbytes(key);
    }
    consume(mapper.apply(std::move(inputs)));
    for (const auto& key : group.inputs) source.release(key);
    ++info.done;
    info.elapsed_seconds = clock.seconds();
    if (progress) progress(info);
  }
  info.finished = true;
  info.elapsed_seconds = clock.seconds();
  if (progress) progress(info);
}

// ----------------------------------------------------------------- writing

void save_model_state(const std::string& dir, const ModelStateMapper& mapper, const torch::nn::Module& module,
                      SaveOptions options) {
  if (dir.empty()) throw CheckpointError("save_model_state: the directory is empty; pass the checkpoint directory");
  const StateDict state = module_state_dict(module);
  const StateGroups declared = mapper.state_dependency_groups();
  std::vector<StateGroup> groups(declared.begin(), declared.end());
  KeySet read;
  for (const auto& group : groups) {
    for (const auto& key : group.inputs) {
      if (!state.count(key)) {
        throw CheckpointError(fmt::format("save to {}: the mapper reads '{}', which the module does not have", dir,
                                          key));
      }
      read.insert(key);
    }
  }
  std::vector<std::string> unread;
  for (const auto& item : state) {
    if (!read.count(item.first)) unread.push_back(item.first);
  }
  if (!unread.empty()) {
    throw CheckpointError(fmt::format("save to {}: no mapper group reads {} module keys ({}); they would be lost. "
                                      "Use a mapper covering every key (identity_mapper_from_module saves as is)",
                                      dir, unread.size(), fmt::join(unread, ", ")));
  }
  auto run = [&](const StateGroup& group) {
    StateDict inputs;
    for (const auto& key : group.inputs) inputs.emplace(key, state.at(key));
    return mapper.apply(std::move(inputs));
  };

  // Plan shards from the output sizes, in group order.
  std::vector<std::vector<size_t>> shards(1);
  std::vector<uint64_t> shard_bytes(1, 0);
  uint64_t total = 0;
  for (size_t i = 0; i < groups.size(); ++i) {
    uint64_t bytes = 0;
    for (const auto& item : run(groups[i])) bytes += nbytes_of(item.second);
    if (options.shard_size > 0 && !shards.back().empty() && shard_bytes.back() + bytes > options.shard_size) {
      shards.emplace_back();
      shard_bytes.push_back(0);
    }
    shards.back().push_back(i);
    shard_bytes.back() += bytes;
    total += bytes;
  }

  std::error_code ec;
  const bool created = !fs::exists(dir, ec);  // then a failed save removes it again
  fs::create_directories(dir, ec);
  if (ec) throw CheckpointError(fmt::format("save to {}: cannot create the directory: {}", dir, ec.message()));
  const bool is_dir = fs::is_directory(dir, ec);
  if (ec || !is_dir) {
    throw CheckpointError(fmt::format("save to {}: {}", dir, ec ? ec.message() : "exists and is not a directory"));
  }

  const size_t n = shards.size();
  std::vector<std::string> names;
  for (size_t s = 0; s < n; ++s) {
    names.push_back(n == 1 ? "model.safetensors" : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, n));
  }
  // Files of an old checkpoint here, removed once the new one is in place.
  std::set<std::string> old_files;
  const fs::path old_index = fs::path(dir) / "model.safetensors.index.json";
  if (detail::path_exists(old_index, "save to " + dir)) {
    old_files.insert(old_index.filename().string());
    try {
      std::ifstream in(old_index);
      const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      for (const auto& item : parse_safetensors_index(text, old_index.string()).weight_map) old_files.insert(item.second);
    } catch (const CheckpointError&) {
      // A broken old index: its shards cannot be known, so they stay.
    }
  }
  if (detail::path_exists(fs::path(dir) / "model.safetensors", "save to " + dir)) {
    old_files.insert("model.safetensors");
  }

  Clock clock;
  ProgressInfo info{"save", 0, groups.size(), 0, total, 0, false};
  // Shards are completed under temporary names and put in place only when
  // all are: a failed save leaves the old checkpoint as it was.
  PendingFiles pending(dir, /*created_dir=*/created);
  SafetensorsIndex index;
  index.total_size = total;
  for (size_t s = 0; s < n; ++s) {
    StateDict tensors;
    for (size_t i : shards[s]) {
      for (auto& [key, tensor] : run(groups[i])) {
        if (!tensors.emplace(key, tensor).second || index.weight_map.count(key)) {
          throw CheckpointError(fmt::format("save to {}: two mapper groups write '{}'", dir, key));
        }
        info.bytes_done += nbytes_of(tensor);
      }
      ++info.done;
    }
    for (const auto& item : tensors) index.weight_map.emplace(item.first, names[s]);
    save_safetensors(pending.add(names[s]), tensors, options.metadata);
    info.elapsed_seconds = clock.seconds();
    if (options.progress) options.progress(info);
  }
  try {
    pending.commit();
  } catch (const CheckpointError& e) {
    throw CheckpointError(fmt::format("save to {}", e.what()));  // "save to DIR: cannot rename ..."
  }
  for (const auto& name : names) old_files.erase(name);
  if (n > 1) {
    write_file_atomically(old_index.string(), dump_safetensors_index(index));
    old_files.erase(old_index.filename().string());
  }
  // An old index left beside a new model.safetensors would be read instead
  // of it, so a file that cannot be removed is an error, not a leftover.
  std::vector<std::string> kept;
  for (const auto& name : old_files) {
    fs::remove(fs::path(dir) / name, ec);
    if (ec) kept.push_back(fmt::format("{} ({})", name, ec.message()));
  }
  if (!kept.empty()) {
    throw CheckpointError(fmt::format("save to {}: the new checkpoint is written, but files of the old one could not "
                                      "be removed: {}. Remove them, or the directory may read as the old checkpoint",
                                      dir, fmt::join(kept, ", ")));
  }
  info.finished = true;
  info.elapsed_seconds = clock.seconds();
  if (options.progress) options.progress(info);
}

}  // namespace d9d::model_state
