#include <d9d/peft/adapter_layer.h>
#include <d9d/peft/errors.h>

#include <fmt/format.h>

#include <algorithm>
#include <cctype>

namespace d9d::peft {

void validate_adapter_name(const std::string& name) {
  const bool ok = !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
  });
  if (name == "__base__") {
    throw PeftError("adapter name \"__base__\" is reserved: in a mixed batch (MixedBatchScope) it means a row "
                    "without an adapter; choose another name");
  }
  if (!ok) {
    throw PeftError(fmt::format("adapter name \"{}\" is not usable: it becomes part of state-dict keys, so use "
                                "letters, digits, '_' and '-' only (e.g. \"default\", \"task_b\")",
                                name));
  }
}

bool AdapterLayer::has_adapter(const std::string& name) const {
  const auto names = adapter_names();
  return std::find(names.begin(), names.end(), name) != names.end();
}

void AdapterLayer::after_state_loaded(const model_state::KeySet& loaded_keys) {
  bool base = false;
  model_state::KeySet adapter_keys;
  for (const auto& key : loaded_keys) {
    if (key.rfind("base.", 0) == 0) base = true;
    else adapter_keys.insert(key);
  }
  if (base) after_base_loaded(adapter_keys);
}

}  // namespace d9d::peft
