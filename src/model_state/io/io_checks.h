#pragma once
// Checks shared by the checkpoint readers and writers (not installed): file
// system queries and JSON strings that fail as CheckpointErrors naming the
// path, never as std::filesystem_error or nlohmann::json::exception.

#include <d9d/model_state/io/safetensors.h>

#include <nlohmann/json.hpp>

#include <fmt/format.h>

#include <filesystem>
#include <string>
#include <system_error>

namespace d9d::model_state::detail {

/// Whether `path` exists. A failure other than "no such file" (a path too
/// long, an I/O error) is a CheckpointError: `<context>: cannot access <path>: <reason>`.
inline bool path_exists(const std::filesystem::path& path, const std::string& context) {
  std::error_code ec;
  const std::filesystem::file_status status = std::filesystem::status(path, ec);
  if (status.type() == std::filesystem::file_type::not_found) return false;
  if (ec) throw CheckpointError(fmt::format("{}: cannot access {}: {}", context, path.string(), ec.message()));
  return true;
}

/// `text` as a JSON string for a message, invalid UTF-8 replaced by U+FFFD.
inline std::string printable(const std::string& text) {
  return nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

/// Throws unless `text` can be written as a JSON string (it is valid UTF-8):
/// `<context>: <what> "..." is not valid UTF-8; ...`.
inline void check_json_string(const std::string& text, const std::string& context, const char* what) {
  try {
    (void)nlohmann::json(text).dump();
  } catch (const nlohmann::json::exception&) {
    throw CheckpointError(fmt::format("{}: {} {} is not valid UTF-8; the file format stores it as a JSON string",
                                      context, what, printable(text)));
  }
}

}  // namespace d9d::model_state::detail
