#pragma once

// Each row of a batch through its own adapter, as PEFT's `adapter_names=`
// argument: one model serving many fine-tunes in one forward.
//
// ```
// d9d::peft::hf::load_adapter(*model, "adapters/summarise", "summarise");
// d9d::peft::hf::load_adapter(*model, "adapters/translate", "translate");
// model->eval();
// {
//   // ids is [4, T]: row i is computed with the adapter rows[i] names.
//   d9d::peft::MixedBatchScope scope(*model, {"summarise", "translate", "__base__", "summarise"});
//   auto logits = model->forward(ids);
// }
// ```
//
// Inside the scope every adapter layer computes its base once for the whole
// batch and then each adapter's low-rank term for its own rows only: the rows
// are grouped by adapter once per batch (`MixedBatch::order`), each layer
// gathers its input in that order, runs the adapters' low-rank products on
// their contiguous segments (two batched products when they compute alike)
// and adds the results back with one `index_add`. The extra work over a
// single-adapter batch is the gather and the scatter, not a forward per
// adapter.
//
// Rows named `"__base__"` get the base model alone. The active adapters
// (`set_adapter`) do not matter inside the scope; disabled adapters
// (`DisableAdapters`) still are: the base alone. Gradients flow through the
// scope to every adapter that some row uses (train-mode dropout applies per
// adapter), so it can also train several adapters on one mixed batch.

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace torch::nn {
class Module;
}

namespace d9d::peft {

/// The adapter name that means "no adapter" in a mixed batch (PEFT's).
inline const std::string kBaseAdapterName = "__base__";

/// The plan of one mixed batch: which adapter each row uses and the rows
/// grouped by adapter. A `MixedBatchScope` builds it once and every layer
/// shares it.
class MixedBatch {
 public:
  /// The rows of one adapter: `order()[begin, end)`.
  struct Segment {
    std::string adapter;
    int64_t begin = 0;
    int64_t end = 0;
  };

  explicit MixedBatch(std::vector<std::string> row_adapters);

  const std::vector<std::string>& row_adapters() const noexcept { return rows_; }
  int64_t rows() const noexcept { return static_cast<int64_t>(rows_.size()); }
  /// One segment per adapter other than `"__base__"`, in order of first
  /// appearance.
  const std::vector<Segment>& segments() const noexcept { return segments_; }
  /// The indices of the rows that use an adapter, grouped by adapter as
  /// `segments()` says, as an int64 tensor on `device` (made once per device).
  const at::Tensor& order(const c10::Device& device) const;
  /// `order` as host values.
  const std::vector<int64_t>& order_indices() const noexcept { return order_; }

  /// What one layer computes: the segments of the adapters `holds` accepts
  /// (those the layer holds; its other rows get the base alone) and the
  /// indices of their rows, segment after segment, on `device`.
  struct Selection {
    std::vector<const Segment*> segments;
    at::Tensor order;
  };
  Selection select(const std::function<bool(const std::string&)>& holds, const c10::Device& device) const;

 private:
  std::vector<std::string> rows_;
  std::vector<Segment> segments_;
  std::vector<int64_t> order_;
  mutable std::map<std::string, at::Tensor> order_on_;
};

/// Makes every adapter layer of `model` compute row `i` of its input (the
/// first dimension) with adapter `adapter_names[i]` while the scope lives.
///
/// Refused with a `PeftError`, before any layer is changed: an empty list; a
/// name no layer holds (the message lists the adapters there are); any
/// adapter layer whose method cannot mix a batch (it is named: it would apply
/// its active adapters to every row); any merged adapter (as PEFT: call `unmerge_adapters` first); a
/// model already inside a scope. A forward whose input does not have
/// `adapter_names.size()` rows is a `PeftError` naming the layer, and so is
/// one after an adapter was merged inside the scope. The rows must be the
/// first dimension of every adapter layer's input: a layer seeing `[T, B, d]`
/// is caught only when `T != B`. One scope's forwards must not run on several
/// threads at once (the plan caches its index tensors per device).
///
/// LoRA layers (linear and embedding, rsLoRA, and, unlike PEFT, DoRA) can mix
/// a batch. The scope holds the layers, not the model: do not add or remove
/// adapters inside it.
class MixedBatchScope {
 public:
  MixedBatchScope(torch::nn::Module& model, std::vector<std::string> adapter_names);
  ~MixedBatchScope();
  MixedBatchScope(const MixedBatchScope&) = delete;
  MixedBatchScope& operator=(const MixedBatchScope&) = delete;

  const MixedBatch& batch() const noexcept { return *batch_; }

 private:
  std::shared_ptr<const MixedBatch> batch_;
  std::vector<std::shared_ptr<torch::nn::Module>> layers_;
};

}  // namespace d9d::peft
