#include <d9d/model_state/io/source.h>
#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>

#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/module.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "torch_error_text.h"

#include <chrono>

namespace d9d::model_state {

namespace {

std::string shape_str(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

void list_keys(std::string& out, const char* what, const std::vector<std::string>& keys) {
  if (keys.empty()) return;
  constexpr size_t kShown = 20;
  out += fmt::format("\n  {} ({}): ", what, keys.size());
  for (size_t i = 0; i < keys.size() && i < kShown; ++i) out += (i ? ", " : "") + keys[i];
  if (keys.size() > kShown) out += fmt::format(", ... and {} more", keys.size() - kShown);
}

/// The groups of `mapper` in reading order: by the file of their first input,
/// then by key, so a sharded checkpoint is read shard by shard.
std::vector<StateGroup> reading_order(const StateSource& source, const ModelStateMapper& mapper) {
  std::vector<std::pair<std::pair<std::string, std::string>, StateGroup>> keyed;
  for (const auto& group : mapper.state_dependency_groups()) {
    const std::string first = group.inputs.empty() ? std::string() : *group.inputs.begin();
    const std::string where = !first.empty() && source.contains(first) ? source.location(first) : std::string();
    keyed.push_back({{where, first}, group});
  }
  std::sort(keyed.begin(), keyed.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<StateGroup> out;
  for (auto& item : keyed) out.push_back(std::move(item.second));
  return out;
}

StateDict run_group(const StateSource& source, const ModelStateMapper& mapper, const StateGroup& group) {
  StateDict inputs;
  for (const auto& key : group.inputs) inputs.emplace(key, source.read_view(key));
  StateDict outputs = mapper.apply(std::move(inputs));
  KeySet got;
  for (const auto& item : outputs) got.insert(item.first);
  if (got != group.outputs) {
    throw MapperError(fmt::format("load: the mapper declared group {} but its apply() returned {}", to_string(group),
                                  format_keys(got)));
  }
  return outputs;
}

/// `run_group` on the meta device: the shapes and dtypes the group gives,
/// without reading data. A mapper that cannot run on meta tensors (an op
/// without a meta kernel, a tensor it creates on the CPU) runs on the data.
StateDict run_group_shapes(const StateSource& source, const ModelStateMapper& mapper, const StateGroup& group) {
  try {
    StateDict inputs;
    for (const auto& key : group.inputs) inputs.emplace(key, source.read_meta(key));
    StateDict outputs = mapper.apply(std::move(inputs));
    KeySet got;
    for (const auto& item : outputs) got.insert(item.first);
    if (got == group.outputs) return outputs;
  } catch (const c10::OutOfMemoryError&) {
    throw;
  } catch (const c10::Error&) {
  }
  StateDict outputs = run_group(source, mapper, group);
  for (const auto& key : group.inputs) source.release(key);
  return outputs;
}

bool fits(const at::Tensor& target, const at::Tensor& source) {
  return source.defined() && source.sizes() == target.sizes() && source.scalar_type() == target.scalar_type();
}

class Tracker {
 public:
  Tracker(const ProgressCallback& callback, std::string stage, size_t total, uint64_t bytes_total)
      : callback_(callback), start_(std::chrono::steady_clock::now()) {
    info_.stage = std::move(stage);
    info_.total = total;
    info_.bytes_total = bytes_total;
  }
  void step(uint64_t bytes) {
    ++info_.done;
    info_.bytes_done += bytes;
    emit(false);
  }
  void finish() { emit(true); }

 private:
  void emit(bool finished) {
    if (!callback_) return;
    info_.finished = finished;
    info_.elapsed_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    callback_(info_);
  }
  const ProgressCallback& callback_;
  std::chrono::steady_clock::time_point start_;
  ProgressInfo info_;
};

/// Tells every `FreshState` module which of its keys were just loaded.
void notify_loaded(torch::nn::Module& module, const std::vector<std::string>& loaded) {
  if (loaded.empty()) return;
  auto notify = [&loaded](const std::string& name, torch::nn::Module& m) {
    auto* fresh = dynamic_cast<FreshState*>(&m);
    if (!fresh) return;
    const std::string prefix = name.empty() ? "" : name + ".";
    KeySet relative;
    for (const auto& key : loaded) {
      if (key.compare(0, prefix.size(), prefix) == 0) relative.insert(key.substr(prefix.size()));
    }
    if (!relative.empty()) fresh->after_state_loaded(relative);
  };
  // The root apart: include_self needs it held by a shared_ptr, and a model
  // on the stack is not.
  notify("", module);
  for (const auto& item : module.named_modules("", /*include_self=*/false)) notify(item.key(), *item.value());
}

}  // namespace

KeySet fresh_state_keys(const torch::nn::Module& module) {
  KeySet keys;
  auto add = [&keys](const std::string& prefix, const torch::nn::Module& m) {
    if (const auto* fresh = dynamic_cast<const FreshState*>(&m)) {
      for (const auto& key : fresh->fresh_state_keys()) keys.insert(prefix.empty() ? key : prefix + "." + key);
    }
  };
  add("", module);
  for (const auto& item : module.named_modules("", /*include_self=*/false)) add(item.key(), *item.value());
  return keys;
}

std::string LoadReport::to_string() const {
  std::string out;
  list_keys(out, "model keys no source provides", missing_keys);
  list_keys(out, "keys the mapper needs that the source lacks", missing_source_keys);
  list_keys(out, "source keys no mapper group reads", unexpected_keys);
  list_keys(out, "mapper outputs the model does not have", unknown_output_keys);
  if (!mismatched_keys.empty()) {
    out += fmt::format("\n  keys that do not fit the model ({}):", mismatched_keys.size());
    for (const auto& m : mismatched_keys) {
      out += fmt::format("\n    {}: model {} {}, source {} {}", m.key, shape_str(m.expected_shape), m.expected_dtype,
                         shape_str(m.got_shape), m.got_dtype);
    }
  }
  return out.empty() ? "all keys loaded" : out.substr(1);
}

LoadReport load_model_state(const StateSource& source, const ModelStateMapper& mapper, torch::nn::Module& module,
                            LoadOptions options) {
  if (options.device) {
    try {
      module.to(*options.device);
    } catch (const c10::OutOfMemoryError&) {
      throw;
    } catch (const c10::Error& error) {
      throw StateLoadError(fmt::format("load from {}: cannot move the model to {} (nothing was loaded; the model may "
                                       "be partly moved): {}. Pass a LoadOptions::device this LibTorch build and "
                                       "machine have",
                                       source.describe(), options.device->str(), detail::torch_error_text(error)),
                           LoadReport{});
    }
  }
  const StateDict model = module_state_dict(module);
  // Writing into a meta tensor is a no-op: such a load would "succeed" with
  // nothing loaded.
  for (const auto& [key, tensor] : model) {
    if (!tensor.is_meta()) continue;
    size_t count = 0;
    for (const auto& item : model) count += item.second.is_meta() ? 1 : 0;
    throw StateLoadError(fmt::format("load from {}: the model's '{}' is on the meta device ({} of {} tensors are), "
                                     "which holds no data to load into (nothing was loaded). Build the model's "
                                     "tensors on the CPU or a GPU before loading into it",
                                     source.describe(), key, count, model.size()),
                         LoadReport{});
  }
  const KeySet fresh = fresh_state_keys(module);
  const std::vector<StateGroup> groups = reading_order(source, mapper);
  LoadReport report;

  // Keys first, from the declarations alone.
  KeySet consumed, produced;
  std::vector<const StateGroup*> runnable;
  uint64_t bytes_total = 0;
  for (const auto& group : groups) {
    bool complete = true;
    for (const auto& key : group.inputs) {
      consumed.insert(key);
      if (!source.contains(key)) {
        report.missing_source_keys.push_back(key);
        complete = false;
      }
    }
    if (!complete) continue;
    runnable.push_back(&group);
    for (const auto& key : group.inputs) bytes_total += source.nbytes(key);
    for (const auto& key : group.outputs) {
      produced.insert(key);
      if (!model.count(key)) report.unknown_output_keys.push_back(key);
    }
  }
  for (const auto& key : source.keys()) {
    if (!consumed.count(key)) report.unexpected_keys.push_back(key);
  }
  for (const auto& item : model) {
    if (!produced.count(item.first) && !fresh.count(item.first)) report.missing_keys.push_back(item.first);
  }
  // Shapes and dtypes: map every group once on the meta device, which reads
  // no data (files answer from their headers).
  for (const StateGroup* group : runnable) {
    for (const auto& [key, tensor] : run_group_shapes(source, mapper, *group)) {
      auto it = model.find(key);
      if (it == model.end() || fits(it->second, tensor)) continue;
      MismatchedKey m{key, it->second.sizes().vec(), {}, std::string(c10::toString(it->second.scalar_type())),
                      "undefined"};
      if (tensor.defined()) {
        m.got_shape = tensor.sizes().vec();
        m.got_dtype = c10::toString(tensor.scalar_type());
      }
      report.mismatched_keys.push_back(std::move(m));
    }
  }
  if (options.strict && !report.ok()) {
    throw StateLoadError(fmt::format("load from {}: the state does not fit the model (nothing was loaded):\n{}\n  "
                                     "Check that the checkpoint belongs to this model and that the mapper is the one "
                                     "returned by inject_peft_and_freeze.",
                                     source.describe(), report.to_string()),
                         report);
  }

  // Copy, group by group, letting go of each group's memory once written.
  torch::NoGradGuard no_grad;
  Tracker tracker(options.progress, "load", runnable.size(), bytes_total);
  for (const StateGroup* group : runnable) {
    uint64_t bytes = 0;
    for (const auto& key : group->inputs) bytes += source.nbytes(key);
    for (auto& [key, tensor] : run_group(source, mapper, *group)) {
      auto it = model.find(key);
      if (it == model.end() || !fits(it->second, tensor)) continue;
      at::Tensor target = it->second;
      try {
        target.copy_(tensor);
      } catch (const c10::OutOfMemoryError&) {
        throw;
      } catch (const c10::Error& error) {
        // The checks passed, so the model's own tensor refuses the write
        // (e.g. an expanded view whose elements share memory).
        throw StateLoadError(fmt::format("load from {}: cannot copy '{}' into the model ({} keys were loaded before "
                                         "it): {}. Give the model a tensor of its own under that key",
                                         source.describe(), key, report.loaded_keys.size(),
                                         detail::torch_error_text(error)),
                             report);
      }
      report.loaded_keys.push_back(key);
    }
    for (const auto& key : group->inputs) source.release(key);
    tracker.step(bytes);
  }
  notify_loaded(module, report.loaded_keys);
  tracker.finish();
  return report;
}

LoadReport load_model_state(const std::string& path, const ModelStateMapper& mapper, torch::nn::Module& module,
                            LoadOptions options) {
  return load_model_state(*open_checkpoint(path), mapper, module, std::move(options));
}

LoadReport load_state_dict(torch::nn::Module& module, const StateDict& state_dict, const ModelStateMapper& mapper,
                           LoadOptions options) {
  return load_model_state(*state_dict_source(state_dict), mapper, module, std::move(options));
}

LoadReport load_state_dict(torch::nn::Module& module, const StateDict& state_dict, LoadOptions options) {
  return load_model_state(*state_dict_source(state_dict), *identity_mapper_from_module(module), module,
                          std::move(options));
}

}  // namespace d9d::model_state
