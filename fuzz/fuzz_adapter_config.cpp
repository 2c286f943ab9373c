// libFuzzer target: the input is the text of a Hugging Face PEFT
// adapter_config.json. It takes load_adapter's path: parse_adapter_config_text
// (JSON, an object, a registered peft_type), then that method's
// load_hf_config. So that every parser is reached whatever peft_type the input
// names, an object is also read by each registered peft_type's load_hf_config
// with its own peft_type set. Bad input may only throw d9d::Error; another
// exception (nlohmann's, std::regex_error, c10::Error, ...), a crash or a
// sanitizer report is a finding. An accepted LoRA or IA3 config must also
// read back unchanged from what the library writes for it.
#include <d9d/error.h>
#include <d9d/peft/hf/config.h>
#include <d9d/peft/hf/files.h>
#include <d9d/peft/ia3/config.h>
#include <d9d/peft/lokr/config.h>
#include <d9d/peft/registry.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <typeinfo>

namespace {

const char* const kSource = "<fuzz input>/adapter_config.json";

[[noreturn]] void finding(const char* what, const std::string& detail) {
  std::fprintf(stderr, "fuzz_adapter_config: %s: %s\n", what, detail.c_str());
  std::abort();
}

/// Runs `step`; a d9d::Error is a rejection (false), anything else thrown is a finding.
template <typename Step>
bool accepted(const char* step_name, Step&& step) {
  try {
    step();
    return true;
  } catch (const d9d::Error&) {
    return false;
  } catch (const std::exception& e) {
    finding(step_name, std::string("escaped ") + typeid(e).name() + ": " + e.what());
  } catch (...) {
    finding(step_name, "escaped a non-std exception");
  }
}

/// What the library writes for an accepted config must parse to the same config.
template <typename Parse, typename Dump>
void check_round_trip(const nlohmann::json& config, Parse parse, Dump dump, const char* name) {
  std::string written;
  if (!accepted(name, [&] { written = dump(parse(config, kSource)); })) return;
  std::string again;
  if (!accepted(name, [&] { again = dump(parse(nlohmann::json::parse(written), "<written>")); })) {
    finding(name, "the library rejects the config it wrote:\n" + written);
  }
  if (again != written) finding(name, "dump -> parse -> dump changed the config:\n" + written + "\n" + again);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace d9d::peft;
  const std::string text(reinterpret_cast<const char*>(data), size);

  // load_adapter's path: the method the file names reads it.
  nlohmann::json config;
  std::string peft_type;
  if (accepted("parse_adapter_config_text", [&] { config = hf::parse_adapter_config_text(text, kSource, peft_type); })) {
    accepted("load_hf_config", [&] { method_for_peft_type(peft_type, kSource).load_hf_config(config, kSource, "fuzz"); });
  } else {
    // Past the peft_type check: any JSON object, read as each method's config.
    try {
      config = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception&) {
      return 0;
    }
    if (!config.is_object()) return 0;
  }
  for (const std::string& type : registered_peft_types()) {
    nlohmann::json typed = config;
    typed["peft_type"] = type;
    accepted("load_hf_config", [&] { method_for_peft_type(type, kSource).load_hf_config(typed, kSource, "fuzz"); });
    if (type == "LORA") check_round_trip(typed, hf::parse_lora_config, hf::dump_lora_config, "LoraConfig round trip");
    if (type == "IA3") check_round_trip(typed, hf::parse_ia3_config, hf::dump_ia3_config, "IA3Config round trip");
    if (type == "LOKR") check_round_trip(typed, hf::parse_lokr_config, hf::dump_lokr_config, "LoKrConfig round trip");
  }
  return 0;
}
