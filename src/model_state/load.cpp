#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>
#include <d9d/model_state/mapper/compose/parallel.h>

#include <torch/nn/module.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <fmt/format.h>

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

LoadReport load_state_dict(torch::nn::Module& module, const StateDict& state_dict, const ModelStateMapper& mapper,
                           LoadOptions options) {
  const StateDict model = module_state_dict(module);
  const KeySet fresh = fresh_state_keys(module);
  LoadReport report;

  KeySet consumed;
  StateDict produced;
  for (const auto& group : mapper.state_dependency_groups()) {
    StateDict inputs;
    bool complete = true;
    for (const auto& key : group.inputs) {
      consumed.insert(key);
      auto it = state_dict.find(key);
      if (it == state_dict.end()) {
        report.missing_source_keys.push_back(key);
        complete = false;
      } else {
        inputs.emplace(key, it->second);
      }
    }
    if (!complete) continue;
    StateDict outputs = mapper.apply(std::move(inputs));
    KeySet got;
    for (const auto& item : outputs) got.insert(item.first);
    if (got != group.outputs) {
      throw MapperError(fmt::format("load_state_dict: the mapper declared group {} but its apply() returned {}",
                                    to_string(group), format_keys(got)));
    }
    for (auto& item : outputs) produced.insert_or_assign(item.first, std::move(item.second));
  }
  for (const auto& item : state_dict) {
    if (!consumed.count(item.first)) report.unexpected_keys.push_back(item.first);
  }

  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  for (const auto& [key, source] : produced) {
    auto it = model.find(key);
    if (it == model.end()) {
      report.unknown_output_keys.push_back(key);
      continue;
    }
    const at::Tensor& target = it->second;
    if (!source.defined() || source.sizes() != target.sizes() || source.scalar_type() != target.scalar_type()) {
      MismatchedKey m{key, target.sizes().vec(), {}, std::string(c10::toString(target.scalar_type())), "undefined"};
      if (source.defined()) {
        m.got_shape = source.sizes().vec();
        m.got_dtype = c10::toString(source.scalar_type());
      }
      report.mismatched_keys.push_back(std::move(m));
      continue;
    }
    copies.emplace_back(target, source);
    report.loaded_keys.push_back(key);
  }
  for (const auto& item : model) {
    if (!produced.count(item.first) && !fresh.count(item.first)) report.missing_keys.push_back(item.first);
  }

  if (options.strict && !report.ok()) {
    throw StateLoadError("load_state_dict: the state does not fit the model (nothing was loaded):\n" +
                             report.to_string() +
                             "\n  Check that the checkpoint belongs to this model and that the mapper is the one "
                             "returned by inject_peft_and_freeze.",
                         report);
  }
  torch::NoGradGuard no_grad;
  for (auto& [target, source] : copies) target.copy_(source);
  return report;
}

LoadReport load_state_dict(torch::nn::Module& module, const StateDict& state_dict, LoadOptions options) {
  return load_state_dict(module, state_dict, *identity_mapper_from_module(module), options);
}

}  // namespace d9d::model_state
