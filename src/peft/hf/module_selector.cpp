// Which modules a Hugging Face PEFT config names (`target_modules`, `exclude_modules`).
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/module_selector.h>
#include <d9d/peft/pattern.h>

#include <fmt/format.h>

#include "../../json_text.h"

#include <algorithm>
#include <cctype>
#include "config_rules.h"

namespace d9d::peft::hf {

using detail::ends_with;
using detail::fail;

using nlohmann::json;

ModuleSelector parse_selector(const json& v, const std::string& source, const std::string& field) {
  ModuleSelector s;
  if (v.is_null()) return s;
  if (v.is_string()) {
    s.regex = v.get<std::string>();
    std::string lower = *s.regex;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
    if (field == "target_modules" && lower == "all-linear") {
      // PEFT resolves it against the Python model (every Linear but the output
      // embedding, which only the model class can name), so no exact reading
      // exists here; PEFT itself saves the resolved list.
      fail(source, field,
           fmt::format("{} is PEFT's shorthand for every linear layer except the model's output layer, which PEFT "
                       "resolves against the Python model and d9d-peft does not resolve; list the module names "
                       "explicitly (e.g. [\"q_proj\", \"v_proj\"]) or give a regular expression. An adapter "
                       "saved by PEFT holds the resolved list",
                       d9d::detail::quote_json(v)));
    }
    if (auto why = Pattern::syntax_error(*s.regex); !why.empty()) fail(source, field, why);
    return s;
  }
  if (!v.is_array()) fail(source, field, fmt::format("expected a list of names or a regex string, got {}", d9d::detail::quote_json(v)));
  for (const auto& item : v) {
    if (!item.is_string()) fail(source, field, fmt::format("expected names, got {}", d9d::detail::quote_json(item)));
    s.names.push_back(item.get<std::string>());
  }
  return s;
}

json selector_json(const ModuleSelector& s) {
  if (s.regex) return *s.regex;
  if (s.names.empty()) return nullptr;
  return s.names;
}

bool ModuleSelector::matches(const std::string& name) const {
  if (regex) return Pattern(*regex, "regex").full_match(name);
  for (const auto& target : names) {
    if (name == target || ends_with(name, "." + target)) return true;
  }
  return false;
}

std::string ModuleSelector::describe() const { return selector_json(*this).dump(); }

}  // namespace d9d::peft::hf
