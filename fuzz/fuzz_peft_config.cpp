// libFuzzer target: the input is the text of a d9d JSON PEFT config (kinds
// "lora", "full_tune", "ia3", "stack", nested). parse_peft_config must accept
// it or throw d9d::Error; another exception (nlohmann's, std::regex_error,
// c10::Error, ...), a crash or a sanitizer report is a finding. An accepted
// config must also validate, build its method, and read back unchanged from
// dump_peft_config.
#include <d9d/error.h>
#include <d9d/peft/all/config.h>
#include <d9d/peft/all/method.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <typeinfo>

namespace {

[[noreturn]] void finding(const char* what, const std::string& detail) {
  std::fprintf(stderr, "fuzz_peft_config: %s: %s\n", what, detail.c_str());
  std::abort();
}

/// Runs `step` on an accepted config: any exception is a finding.
template <typename Step>
void must_pass(const char* step_name, Step&& step) {
  try {
    step();
  } catch (const std::exception& e) {
    finding(step_name, std::string("threw ") + typeid(e).name() + ": " + e.what());
  } catch (...) {
    finding(step_name, "threw a non-std exception");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace d9d::peft;
  const std::string text(reinterpret_cast<const char*>(data), size);
  AnyPeftConfig config;
  try {
    config = parse_peft_config(text, "<fuzz input>");
  } catch (const d9d::Error&) {
    return 0;
  } catch (const std::exception& e) {
    finding("parse_peft_config", std::string("escaped ") + typeid(e).name() + ": " + e.what());
  } catch (...) {
    finding("parse_peft_config", "escaped a non-std exception");
  }

  must_pass("validate", [&] { validate(config); });
  must_pass("peft_method_from_config", [&] { peft_method_from_config(config); });
  std::string written;
  must_pass("dump_peft_config", [&] { written = dump_peft_config(config); });
  std::string again;
  must_pass("parse_peft_config of the dumped config",
            [&] { again = dump_peft_config(parse_peft_config(written, "<dumped>")); });
  if (again != written) finding("round trip", "dump -> parse -> dump changed the config:\n" + written + "\n" + again);
  return 0;
}
