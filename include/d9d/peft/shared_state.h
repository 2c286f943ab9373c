#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace d9d::peft {

/// State that every layer holding an adapter shares: the same tensor in each
/// (VeRA's frozen random projections). Adapter files hold it once, under
/// `base_model.<key>` (`base_model.vera_A`), not per layer.
struct SharedAdapterState {
  std::string key;
  at::Tensor tensor;
  /// False where the method rebuilds the state instead of reading it (VeRA
  /// with `save_projection` false): files then neither hold nor need it.
  bool in_files = true;
};

/// Implemented, beside `AdapterLayer`, by the layers of methods whose adapters
/// hold model-wide state (VeRA). `hf::get_peft_model_state_dict`,
/// `hf::set_peft_model_state_dict` and so `hf::save_adapter`/`load_adapter`
/// write and read it once per adapter, and check that every layer holds the
/// same tensor.
class SharesAdapterState {
 public:
  virtual ~SharesAdapterState() = default;
  /// What adapter `name` shares with the model's other layers.
  virtual std::vector<SharedAdapterState> shared_adapter_state(const std::string& name) const = 0;
};

}  // namespace d9d::peft
