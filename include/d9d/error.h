#pragma once

#include <stdexcept>
#include <string>

namespace d9d {

/// The root of every exception d9d-peft throws on purpose: each exception a
/// public d9d-peft function documents is a subclass, so one `catch` covers
/// the library:
///
/// - `d9d::peft::PeftError`: a PEFT method could not be applied, merged or
///   used (a matched layer that cannot be adapted, an adapter layer dropped
///   without a merge, a Hugging Face adapter that does not fit the model);
/// - `d9d::peft::ConfigError`: a configuration or layer option is invalid
///   (`path()` names the field);
/// - `d9d::model_state::MapperError`: state mappers composed inconsistently
///   or applied to the wrong keys;
/// - `d9d::model_state::CheckpointError`: a checkpoint file, index or
///   directory is malformed, unreadable or cannot be written (the message
///   names the path and the key);
/// - `d9d::model_state::StateLoadError`: a load that cannot be made (a strict
///   load whose state does not fit the model: `report()` says how).
///
/// What LibTorch throws from tensor computation (a `forward` given an input
/// of the wrong shape, `c10::OutOfMemoryError`) stays LibTorch's `c10::Error`.
///
/// ```
/// try {
///   d9d::model_state::load_model_state("checkpoints/base", *mapper, *model);
/// } catch (const d9d::Error& e) {
///   std::cerr << e.what() << "\n";
/// }
/// ```
///
/// A message shows every character it holds: a NUL or another control
/// character (other than a line break or a tab) from a key or a name read
/// from a file is written as `\u0000`, since `what()` would end at a NUL and
/// hide the rest of the message.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(visible(what)) {}
  explicit Error(const char* what) : Error(std::string(what)) {}

 private:
  static std::string visible(const std::string& text) {
    std::string out;
    out.reserve(text.size());
    for (const char c : text) {
      const auto u = static_cast<unsigned char>(c);
      if ((u < 0x20 && c != '\n' && c != '\t') || u == 0x7f) {
        static const char digits[] = "0123456789abcdef";
        out += "\\u00";
        out += digits[u >> 4];
        out += digits[u & 15];
      } else {
        out += c;
      }
    }
    return out;
  }
};

}  // namespace d9d
