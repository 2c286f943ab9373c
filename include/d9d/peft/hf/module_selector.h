#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

namespace d9d::peft::hf {

/// Which modules a Hugging Face PEFT config names: a list of names (a module
/// matches when its qualified name equals one or ends with "." + one) or one
/// regular expression that must match the whole name.
struct ModuleSelector {
  std::vector<std::string> names;
  std::optional<std::string> regex;

  bool empty() const { return names.empty() && !regex; }
  bool matches(const std::string& qualified_name) const;
  /// As the config writes it, for messages: `["q_proj","v_proj"]` or `".*proj"`.
  std::string describe() const;
};

/// Reads a selector field (`target_modules`, `exclude_modules`): null, a list
/// of names, or a regex string, compiled here; `ConfigError` naming
/// `source: field` otherwise.
ModuleSelector parse_selector(const nlohmann::json& value, const std::string& source, const std::string& field);

/// The JSON a config holds for a selector: null, a list, or the regex string.
nlohmann::json selector_json(const ModuleSelector& selector);

}  // namespace d9d::peft::hf
