// PEFT's `target_parameters` form of grouped expert adapters: the keys (one
// wrapper per targeted parameter, nested in registration order) and the factor
// layout (A's rows in blocks of r per expert, B's columns interleaved), as
// tests/peft_reference/moe_target_parameters.md sets out for PEFT 0.21.
#include "grouped_keys.h"

#include <d9d/peft/adapters.h>
#include <d9d/peft/errors.h>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <map>

namespace d9d::peft::hf {

std::string to_string(ExpertStorage storage) {
  switch (storage) {
    case ExpertStorage::out_in: return "out_in";
    case ExpertStorage::in_out: return "in_out";
    case ExpertStorage::in_out_undeclared: return "in_out_undeclared";
  }
  return "?";
}

namespace detail {

namespace {

std::string shape_str(at::IntArrayRef sizes) { return fmt::format("[{}]", fmt::join(sizes, ", ")); }

std::string parent_of(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? std::string() : name.substr(0, dot);
}

struct Sizes {
  int64_t experts, in, out, r;
};

Sizes sizes_of(const GroupedSlot& slot) {
  const auto& a = slot.adapter->lora_A->weight;  // [E, in, r]
  const auto& b = slot.adapter->lora_B->weight;  // [E, r, out]
  return {a.size(0), a.size(1), b.size(2), a.size(2)};
}

void refuse_single_in_out(const GroupedSlot& slot, const std::string& what) {
  throw PeftError(fmt::format(
      "{}: '{}' has one expert and ExpertStorage::in_out ([E, in, out] with is_transposed): PEFT 0.21 cannot compute "
      "such an adapter (its forward fails unless the parameter is square, and then adds the delta untransposed), so "
      "no PEFT file describes it. Use ExpertStorage::out_in or in_out_undeclared if that is how the model stores it",
      what, slot.layer));
}

}  // namespace

std::vector<GroupedSlot> grouped_slots(const torch::nn::Module& module, const std::string& adapter_name) {
  std::vector<GroupedSlot> slots;
  for (const auto& entry : adapter_layers(module)) {
    if (!entry.layer->has_adapter(adapter_name)) continue;
    const auto* adapter =
        dynamic_cast<const LoRAGroupedLinearAdapterImpl*>(entry.layer->adapter_module(adapter_name).get());
    if (adapter) slots.push_back({entry.name, {}, adapter});
  }
  // PEFT wraps the owning module once per targeted parameter, walking them in
  // registration order, each wrapper around the previous: the j-th of k sits
  // under k-1-j `base_layer.` infixes. Layers come depth-first in registration
  // order, so siblings appear in their parent's order.
  std::map<std::string, int64_t> count;
  for (const auto& s : slots) ++count[parent_of(s.layer)];
  std::map<std::string, int64_t> seen;
  for (auto& s : slots) {
    const std::string parent = parent_of(s.layer);
    const int64_t j = seen[parent]++;
    s.prefix = parent.empty() ? std::string() : parent + ".";
    for (int64_t i = 0; i < count[parent] - 1 - j; ++i) s.prefix += "base_layer.";
  }
  return slots;
}

std::pair<at::Tensor, at::Tensor> to_peft_factors(const GroupedSlot& slot, const ExpertOptions& options) {
  const Sizes n = sizes_of(slot);
  const at::Tensor a = slot.adapter->lora_A->weight.detach();  // [E, in, r]
  const at::Tensor b = slot.adapter->lora_B->weight.detach();  // [E, r, out]
  if (n.experts == 1 && options.storage() == ExpertStorage::in_out) refuse_single_in_out(slot, "save_adapter");
  if (options.storage() == ExpertStorage::in_out_undeclared) {
    // PEFT reads [E, in, out] as [E, out', in']: its lora_A holds our B, its lora_B our A.
    return {b.reshape({n.experts * n.r, n.out}).contiguous(), a.permute({1, 2, 0}).reshape({n.in, n.r * n.experts}).contiguous()};
  }
  return {a.transpose(1, 2).reshape({n.experts * n.r, n.in}).contiguous(),
          b.permute({2, 1, 0}).reshape({n.out, n.r * n.experts}).contiguous()};
}

std::pair<at::Tensor, at::Tensor> from_peft_factors(const GroupedSlot& slot, const at::Tensor& a, const at::Tensor& b,
                                                    const ExpertOptions& options, const std::string& source,
                                                    const std::string& key_a, const std::string& key_b) {
  const Sizes n = sizes_of(slot);
  const int64_t re = n.r * n.experts;
  auto mismatch = [&] {
    return PeftError(fmt::format(
        "{}: the factors of '{}' do not fit the model (nothing was loaded): {} is {} and {} is {}; expected {} and {} "
        "(E = {} experts, rank {}, in {}, out {}; lora_A [r*E, in], lora_B [out, r*E]), or {} and {} as PEFT writes a "
        "[E, in, out] parameter without is_transposed (Llama 4). Wrong base model, or rank_pattern?",
        source, slot.layer, key_a, shape_str(a.sizes()), key_b, shape_str(b.sizes()),
        shape_str({re, n.in}), shape_str({n.out, re}), n.experts, n.r, n.in, n.out, shape_str({re, n.out}),
        shape_str({n.in, re})));
  };
  if (a.dim() != 2 || b.dim() != 2 || a.size(0) != re || b.size(1) != re) throw mismatch();
  const bool fits_plain = a.size(1) == n.in && b.size(0) == n.out;
  const bool fits_swapped = a.size(1) == n.out && b.size(0) == n.in;
  if (!fits_plain && !fits_swapped) throw mismatch();
  // Only a square layer leaves the convention to the caller's option.
  const bool swapped = fits_plain && fits_swapped ? options.storage() == ExpertStorage::in_out_undeclared : fits_swapped;
  if (!swapped && n.experts == 1 && options.storage() == ExpertStorage::in_out) refuse_single_in_out(slot, source);
  for (const auto* t : {&a, &b}) {
    if (!at::isfinite(*t).all().item<bool>()) {
      throw PeftError(fmt::format("{}: {} holds NaN or infinite values; nothing was loaded (the adapter file is "
                                  "damaged, or its training diverged)",
                                  source, t == &a ? key_a : key_b));
    }
  }
  if (swapped) {
    return {b.reshape({n.in, n.r, n.experts}).permute({2, 0, 1}), a.reshape({n.experts, n.r, n.out})};
  }
  return {a.reshape({n.experts, n.r, n.in}).transpose(1, 2), b.reshape({n.out, n.r, n.experts}).permute({2, 1, 0})};
}

}  // namespace detail

}  // namespace d9d::peft::hf
