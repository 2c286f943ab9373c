// Mixed batches: the plan shared by the layers, and the scope that sets it.
#include <d9d/peft/adapters.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/mixed_batch.h>

#include <ATen/Functions.h>
#include <c10/core/InferenceMode.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

namespace d9d::peft {

MixedBatch::MixedBatch(std::vector<std::string> row_adapters) : rows_(std::move(row_adapters)) {
  std::vector<std::string> first_seen;
  for (const auto& name : rows_) {
    if (name != kBaseAdapterName && std::find(first_seen.begin(), first_seen.end(), name) == first_seen.end()) {
      first_seen.push_back(name);
    }
  }
  for (const auto& name : first_seen) {
    Segment segment{name, static_cast<int64_t>(order_.size()), 0};
    for (size_t row = 0; row < rows_.size(); ++row) {
      if (rows_[row] == name) order_.push_back(static_cast<int64_t>(row));
    }
    segment.end = static_cast<int64_t>(order_.size());
    segments_.push_back(std::move(segment));
  }
}

const at::Tensor& MixedBatch::order(const c10::Device& device) const {
  const std::string key = device.str();
  auto it = order_on_.find(key);
  if (it == order_on_.end()) {
    // A normal tensor even when the first forward runs under InferenceMode:
    // a later forward with grad saves it for backward.
    c10::InferenceMode normal(false);
    at::Tensor cpu = at::tensor(order_, at::TensorOptions().dtype(at::kLong));
    it = order_on_.emplace(key, device.is_cpu() ? cpu : cpu.to(device)).first;
  }
  return it->second;
}

MixedBatch::Selection MixedBatch::select(const std::function<bool(const std::string&)>& holds,
                                         const c10::Device& device) const {
  Selection selection;
  for (const auto& segment : segments_) {
    if (holds(segment.adapter)) selection.segments.push_back(&segment);
  }
  const at::Tensor& all = order(device);
  if (selection.segments.size() == segments_.size()) {
    selection.order = all;
  } else if (!selection.segments.empty()) {
    std::vector<at::Tensor> parts;
    for (const auto* segment : selection.segments) parts.push_back(all.slice(0, segment->begin, segment->end));
    selection.order = at::cat(parts);
  }
  return selection;
}

void AdapterLayer::set_mixed_batch(std::shared_ptr<const MixedBatch> batch, std::string layer_name) {
  mixed_batch_ = std::move(batch);
  mixed_batch_layer_ = std::move(layer_name);
  mixed_batch_changed();
}

void AdapterLayer::check_mixed_batch_rows(const at::Tensor& input) const {
  const int64_t rows = mixed_batch_->rows();
  if (input.dim() == 0 || input.size(0) != rows) {
    throw PeftError(fmt::format(
        "{}: the mixed batch names an adapter for {} rows, but this layer's input has {} (its first dimension, "
        "shape [{}]); give MixedBatchScope one adapter name per row of the batch",
        mixed_batch_layer_.empty() ? std::string("adapter layer") : mixed_batch_layer_, rows,
        input.dim() == 0 ? int64_t{0} : input.size(0), fmt::join(input.sizes(), ", ")));
  }
}

void AdapterLayer::check_mixed_batch_unmerged() const {
  const auto merged = merged_adapters();
  if (!merged.empty()) {
    throw PeftError(fmt::format("{}: adapters {} were merged inside a MixedBatchScope; a mixed batch computes each "
                                "row's adapter apart from the base, so unmerge them (unmerge_adapters) or end the "
                                "scope before merging",
                                mixed_batch_layer_.empty() ? std::string("adapter layer") : mixed_batch_layer_,
                                fmt::join(merged, ", ")));
  }
}

MixedBatchScope::MixedBatchScope(torch::nn::Module& model, std::vector<std::string> adapter_names) {
  if (adapter_names.empty()) {
    throw PeftError("MixedBatchScope: no adapter names; give one per row of the batch (\"__base__\" for a row "
                    "computed by the base model alone)");
  }
  const auto layers = adapter_layers(model);
  if (layers.empty()) {
    throw PeftError("MixedBatchScope: the model has no adapter layers; inject a method or load an adapter first");
  }
  auto held = d9d::peft::adapter_names(model);
  std::sort(held.begin(), held.end());
  for (size_t row = 0; row < adapter_names.size(); ++row) {
    const auto& name = adapter_names[row];
    if (name == kBaseAdapterName) continue;
    if (std::find(held.begin(), held.end(), name) == held.end()) {
      throw PeftError(fmt::format("MixedBatchScope: row {} names adapter \"{}\", which the model does not hold; it "
                                  "holds: {} (and \"__base__\" means no adapter)",
                                  row, name, fmt::join(held, ", ")));
    }
  }
  for (const auto& entry : layers) {
    if (entry.layer->mixed_batch() != nullptr) {
      throw PeftError(fmt::format("MixedBatchScope: layer '{}' is already inside a MixedBatchScope; end that scope "
                                  "before starting another on the same model",
                                  entry.name));
    }
    const auto merged = entry.layer->merged_adapters();
    if (!merged.empty()) {
      throw PeftError(fmt::format("MixedBatchScope: layer '{}' has merged adapters ({}); a mixed batch computes "
                                  "each row's adapter apart from the base, so call unmerge_adapters first",
                                  entry.name, fmt::join(merged, ", ")));
    }
    if (!entry.layer->supports_mixed_batch()) {
      // Even one holding none of the batch's adapters: it would apply its
      // active adapters to every row, which no row asked for.
      throw PeftError(fmt::format("MixedBatchScope: layer '{}' ({}) cannot compute a mixed batch; run its "
                                  "adapters one batch each (set_adapter) instead",
                                  entry.name, entry.layer->peft_type()));
    }
  }
  batch_ = std::make_shared<const MixedBatch>(std::move(adapter_names));
  for (const auto& entry : layers) {
    entry.layer->set_mixed_batch(batch_, entry.name);
    layers_.push_back(entry.module);
  }
}

MixedBatchScope::~MixedBatchScope() {
  for (const auto& module : layers_) {
    if (auto* layer = dynamic_cast<AdapterLayer*>(module.get())) layer->set_mixed_batch(nullptr);
  }
}

}  // namespace d9d::peft
