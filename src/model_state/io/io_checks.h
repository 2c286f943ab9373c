#pragma once
// Checks shared by the checkpoint readers and writers (not installed): file
// system queries and JSON strings that fail as CheckpointErrors naming the
// path, never as std::filesystem_error or nlohmann::json::exception.

#include <d9d/model_state/io/safetensors.h>

#include <nlohmann/json.hpp>

#include <fmt/format.h>

#include <algorithm>
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
  std::string out = nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  // JSON leaves DEL as it is, which a terminal does not show.
  for (size_t at; (at = out.find('\x7f')) != std::string::npos;) out.replace(at, 1, "\\u007f");
  return out;
}

/// A key for a message: 'key' as it is, or, when it holds a control
/// character (a NUL would hide the rest) or is not UTF-8, JSON-escaped.
inline std::string shown_key(const std::string& key) {
  const bool plain = std::none_of(key.begin(), key.end(), [](char c) {
    return static_cast<unsigned char>(c) < 0x20 || c == 0x7f;
  });
  if (plain) {
    try {
      (void)nlohmann::json(key).dump();
      return "'" + key + "'";
    } catch (const nlohmann::json::exception&) {
    }
  }
  return printable(key);
}

/// Throws unless `path` can be handed to the operating system as it is: a
/// NUL ends a C path early, so "a.safetensors\0x" would open "a.safetensors"
/// and two different names would reach one file.
inline void check_path_text(const std::string& path, const std::string& context) {
  if (path.find('\0') != std::string::npos) {
    throw CheckpointError(fmt::format("{}: the path {} contains a NUL character, which no file name can hold; "
                                      "check where the path came from",
                                      context, printable(path)));
  }
}

/// Throws unless `name`, read from `file` at `field`, is a plain file name in
/// one directory: not empty, "." or "..", no '/' or '\\', no NUL or other
/// control character. A name read from a file is checked before it is joined
/// to a directory, opened, written or removed, so no file can point a reader
/// or writer outside its directory or make two names reach one file.
inline void check_file_name(const std::string& name, const std::string& file, const std::string& field) {
  const char* why = nullptr;
  if (name.empty()) why = "it is empty";
  else if (name == "." || name == "..") why = "it names a directory";
  else if (name.find('/') != std::string::npos || name.find('\\') != std::string::npos) {
    why = "it contains a path separator ('/' or '\\')";
  } else if (std::any_of(name.begin(), name.end(), [](char c) {
               return static_cast<unsigned char>(c) < 0x20 || c == 0x7f;
             })) {
    why = name.find('\0') != std::string::npos ? "it contains a NUL character" : "it contains a control character";
  }
  if (why) {
    throw CheckpointError(fmt::format("{}: {} = {} is not a plain file name: {}. It must name a file in the same "
                                      "directory (no '/' or '\\', no control characters, not empty, \".\" or "
                                      "\"..\"); fix or regenerate the file",
                                      file, field, printable(name), why));
  }
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
