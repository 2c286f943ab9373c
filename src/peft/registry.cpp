// The registry of methods: d9d `kind` and PEFT `peft_type` to parser, writer
// and factory.
#include <d9d/peft/errors.h>
#include <d9d/peft/registry.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "builtin_methods.h"

#include <deque>
#include <mutex>

namespace d9d::peft {

namespace {

std::deque<PeftMethodRegistration> builtin_methods() {
  return {lora_registration(), full_tune_registration(), stack_registration(), ia3_registration(),
          loha_registration(), lokr_registration(), oft_registration(), vera_registration()};
}

struct Registry {
  std::mutex mutex;
  // A deque: registering never moves the entries references were handed out to.
  std::deque<PeftMethodRegistration> methods = builtin_methods();
};

Registry& registry() {
  static Registry instance;
  return instance;
}

std::string quoted(const std::vector<std::string>& names) {
  return names.empty() ? std::string("none") : fmt::format("\"{}\"", fmt::join(names, "\", \""));
}

}  // namespace

void register_peft_method(PeftMethodRegistration registration) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (registration.kind.empty() && registration.peft_type.empty()) {
    throw PeftError("register_peft_method: give the method a d9d kind, a PEFT peft_type, or both");
  }
  if (!registration.kind.empty() && (!registration.parse || !registration.write || !registration.make_method)) {
    throw PeftError(fmt::format("register_peft_method(\"{}\"): a method with a d9d kind needs parse, write and "
                                "make_method",
                                registration.kind));
  }
  if (!registration.peft_type.empty() && !registration.load_hf_config) {
    throw PeftError(fmt::format("register_peft_method: peft_type \"{}\" needs load_hf_config", registration.peft_type));
  }
  for (const auto& m : r.methods) {
    if (!registration.kind.empty() && m.kind == registration.kind) {
      throw PeftError(fmt::format("register_peft_method: kind \"{}\" is already registered", m.kind));
    }
    if (!registration.peft_type.empty() && m.peft_type == registration.peft_type) {
      throw PeftError(fmt::format("register_peft_method: peft_type \"{}\" is already registered", m.peft_type));
    }
  }
  r.methods.push_back(std::move(registration));
}

std::vector<std::string> registered_kinds() {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  std::vector<std::string> out;
  for (const auto& m : r.methods) {
    if (!m.kind.empty()) out.push_back(m.kind);
  }
  return out;
}

std::vector<std::string> registered_peft_types() {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  std::vector<std::string> out;
  for (const auto& m : r.methods) {
    if (!m.peft_type.empty()) out.push_back(m.peft_type);
  }
  return out;
}

const PeftMethodRegistration& method_for_kind(const std::string& kind, const std::string& path) {
  {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    for (const auto& m : r.methods) {
      if (!kind.empty() && m.kind == kind) return m;
    }
  }
  throw ConfigError(path, fmt::format("unknown kind \"{}\"; expected one of {}", kind, quoted(registered_kinds())));
}

const PeftMethodRegistration& method_for_peft_type(const std::string& peft_type, const std::string& source) {
  {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    for (const auto& m : r.methods) {
      if (!peft_type.empty() && m.peft_type == peft_type) return m;
    }
  }
  throw ConfigError(source + ": peft_type",
                    fmt::format("\"{}\" is not supported: d9d-peft reads {} adapters", peft_type,
                                quoted(registered_peft_types())));
}

}  // namespace d9d::peft
