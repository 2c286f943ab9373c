#pragma once
// LibTorch's error text for a d9d message (not installed).

#include <c10/util/Exception.h>

#include <string>

namespace d9d::model_state::detail {

/// The first line of a c10::Error's message, without the backtrace or the
/// dispatcher's list of backends that follows it.
inline std::string torch_error_text(const c10::Error& error) {
  std::string text = error.what_without_backtrace();
  const size_t end = text.find('\n');
  if (end != std::string::npos) text.resize(end);
  return text;
}

}  // namespace d9d::model_state::detail
