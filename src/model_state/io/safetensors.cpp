#include <d9d/model_state/io/safetensors.h>

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/StringUtil.h>

#include <nlohmann/json.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "../../json_text.h"
#include "../torch_error_text.h"
#include "io_checks.h"
#include "mapped_file.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace d9d::model_state {

namespace {

using nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100u * 1024u * 1024u;  // the reference reader's limit

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
};

constexpr DtypeInfo kDtypes[] = {
    {"BOOL", at::kBool},   {"U8", at::kByte},  {"I8", at::kChar},       {"I16", at::kShort}, {"F16", at::kHalf},
    {"BF16", at::kBFloat16}, {"I32", at::kInt}, {"I64", at::kLong},     {"F32", at::kFloat}, {"F64", at::kDouble},
};

[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw CheckpointError(fmt::format("{}: {}", source, what));
}

uint64_t to_u64(const json& v, const std::string& source, const std::string& what) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return static_cast<uint64_t>(v.get<int64_t>());
  fail(source, fmt::format("{} must be a non-negative integer, got {}", what, d9d::detail::quote_json(v)));
}

std::string errno_text() { return std::strerror(errno); }

/// The safetensors name of `dtype`, or null for one the format lacks.
const char* find_dtype_name(at::ScalarType dtype) {
  for (const auto& d : kDtypes) {
    if (d.type == dtype) return d.name;
  }
  return nullptr;
}

constexpr const char* kSupportedDtypes = "F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL";

}  // namespace

std::string safetensors_dtype_name(at::ScalarType dtype) {
  if (const char* name = find_dtype_name(dtype)) return name;
  throw CheckpointError(fmt::format("dtype {} has no safetensors name (supported: {})", c10::toString(dtype),
                                    kSupportedDtypes));
}

SafetensorsHeader parse_safetensors_header(const uint8_t* bytes, size_t size, uint64_t file_size,
                                           const std::string& source) {
  if (file_size < 8 || size < 8) {
    fail(source, fmt::format("truncated: {} bytes; a safetensors file starts with an 8-byte header length",
                             file_size));
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  if (n > kMaxHeaderBytes) fail(source, fmt::format("header length {} exceeds the 100 MiB limit (corrupt file?)", n));
  if (n > file_size - 8) {
    fail(source, fmt::format("header length {} runs past the end of the file ({} bytes): truncated or not a "
                             "safetensors file",
                             n, file_size));
  }
  if (n > size - 8) fail(source, "header not fully available in the given bytes");
  const char* text = reinterpret_cast<const char*>(bytes + 8);
  if (n == 0 || text[0] != '{') fail(source, "the header is not a JSON object (it must start with '{')");

  std::set<std::string> seen;
  std::string duplicate;
  json::parser_callback_t on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && !seen.insert(parsed.get<std::string>()).second) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  json header;
  try {
    header = json::parse(text, text + n, on_event);
  } catch (const json::exception& e) {
    fail(source, fmt::format("the header is not valid JSON: {}", e.what()));
  }
  if (!duplicate.empty()) fail(source, fmt::format("key {} appears twice in the header", detail::shown_key(duplicate)));
  if (!header.is_object()) fail(source, "the header is not a JSON object");

  SafetensorsHeader out;
  out.data_offset = 8 + n;
  const uint64_t data_size = file_size - out.data_offset;
  for (const auto& item : header.items()) {
    const std::string& key = item.key();
    const json& value = item.value();
    if (key == "__metadata__") {
      if (!value.is_object()) fail(source, "__metadata__ must be an object of strings");
      for (const auto& m : value.items()) {
        if (!m.value().is_string()) {
          fail(source, fmt::format("__metadata__.{} must be a string, got {}", m.key(), d9d::detail::quote_json(m.value())));
        }
        out.metadata.emplace(m.key(), m.value().get<std::string>());
      }
      continue;
    }
    const std::string where = "tensor " + detail::shown_key(key);
    if (!value.is_object()) fail(source, fmt::format("{}: expected an object, got {}", where, d9d::detail::quote_json(value)));
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!value.contains(field)) fail(source, fmt::format("{}: missing field '{}'", where, field));
    }
    SafetensorsEntry entry{};
    const json& dtype = value["dtype"];
    if (!dtype.is_string()) fail(source, fmt::format("{}: dtype must be a string", where));
    entry.dtype_name = dtype.get<std::string>();
    auto known = std::find_if(std::begin(kDtypes), std::end(kDtypes),
                              [&](const DtypeInfo& d) { return entry.dtype_name == d.name; });
    if (known == std::end(kDtypes)) {
      fail(source, fmt::format("{}: dtype \"{}\" is not supported (supported: {})", where, entry.dtype_name,
                               kSupportedDtypes));
    }
    entry.dtype = known->type;
    const json& shape = value["shape"];
    if (!shape.is_array()) fail(source, fmt::format("{}: shape must be a list", where));
    // The byte count must fit 64 bits (and each dimension LibTorch's int64):
    // a product that wraps would otherwise "match" a small data_offsets span.
    // As the reference reader: the element count, then the bytes, each checked.
    const uint64_t itemsize = c10::elementSize(entry.dtype);
    uint64_t numel = 1;
    bool numel_overflows = false;
    for (const auto& dim : shape) {
      const uint64_t d = to_u64(dim, source, where + " shape entry");
      if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        fail(source, fmt::format("{}: shape {} has dimension {}, larger than 2^63-1 (LibTorch's limit): corrupt "
                                 "header?",
                                 where, d9d::detail::quote_json(shape), d));
      }
      if (d != 0 && numel > std::numeric_limits<uint64_t>::max() / d) numel_overflows = true;
      numel *= d;
      entry.shape.push_back(static_cast<int64_t>(d));
    }
    if (numel_overflows) {
      fail(source, fmt::format("{}: shape {} of {} is too large: its element count overflows 64 bits (corrupt "
                               "header?)",
                               where, d9d::detail::quote_json(shape), entry.dtype_name));
    }
    if (numel > std::numeric_limits<uint64_t>::max() / itemsize) {
      fail(source, fmt::format("{}: shape {} of {} is too large: {} elements of {} bytes ({:.3g} bytes) overflow "
                               "64 bits (corrupt header?)",
                               where, d9d::detail::quote_json(shape), entry.dtype_name, numel, itemsize,
                               static_cast<double>(numel) * static_cast<double>(itemsize)));
    }
    const uint64_t nbytes = numel * itemsize;
    const json& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2) {
      fail(source, fmt::format("{}: data_offsets must be [begin, end], got {}", where, d9d::detail::quote_json(offsets)));
    }
    entry.begin = to_u64(offsets[0], source, where + " data_offsets");
    entry.end = to_u64(offsets[1], source, where + " data_offsets");
    if (entry.end < entry.begin) fail(source, fmt::format("{}: data_offsets {} end before they begin", where, d9d::detail::quote_json(offsets)));
    if (entry.end > data_size) {
      fail(source, fmt::format("{}: data_offsets {} run past the data section ({} bytes): truncated file?", where,
                               d9d::detail::quote_json(offsets), data_size));
    }
    if (nbytes != entry.end - entry.begin) {
      fail(source, fmt::format("{}: shape {} of {} needs {} bytes but data_offsets {} span {}", where,
                               d9d::detail::quote_json(shape), entry.dtype_name, nbytes,
                               d9d::detail::quote_json(offsets), entry.end - entry.begin));
    }
    out.tensors.emplace(key, std::move(entry));
  }

  // The tensors must tile the data section: no overlap, no gap, nothing after.
  std::vector<std::pair<const std::string*, const SafetensorsEntry*>> order;
  for (const auto& item : out.tensors) order.emplace_back(&item.first, &item.second);
  std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return std::tie(a.second->begin, a.second->end) < std::tie(b.second->begin, b.second->end);
  });
  uint64_t cursor = 0;
  const std::string* previous = nullptr;
  for (const auto& [name, entry] : order) {
    if (entry->begin != cursor) {
      fail(source, entry->begin < cursor
                       ? fmt::format("tensor {} (bytes {}..{}) overlaps tensor {} (ends at {})", detail::shown_key(*name),
                                     entry->begin, entry->end, detail::shown_key(previous ? *previous : ""), cursor)
                       : fmt::format("tensor {} starts at byte {} but the previous data ends at {}: gap in the "
                                     "data section",
                                     detail::shown_key(*name), entry->begin, cursor));
    }
    cursor = entry->end;
    previous = name;
  }
  if (cursor != data_size) {
    fail(source, fmt::format("the tensors cover {} bytes of a {}-byte data section: trailing bytes or a corrupt "
                             "header",
                             cursor, data_size));
  }
  return out;
}

// ------------------------------------------------------------------ reading

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  detail::check_path_text(path, "SafetensorsFile::open");
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw CheckpointError(fmt::format("{}: cannot open: {}", path, errno_text()));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const std::string why = errno_text();
    ::close(fd);
    throw CheckpointError(fmt::format("{}: cannot stat: {}", path, why));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw CheckpointError(fmt::format("{}: not a regular file", path));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    parse_safetensors_header(nullptr, 0, size, path);  // throws "truncated"
  }
  std::shared_ptr<detail::MappedFile> mapping;
  try {
    mapping = std::make_shared<detail::MappedFile>(fd, size, path);
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);  // the mapping keeps the file

  auto file = std::shared_ptr<SafetensorsFile>(new SafetensorsFile());
  file->path_ = path;
  try {
    file->header_ =
        parse_safetensors_header(reinterpret_cast<const uint8_t*>(mapping->data()), size, size, path);
  } catch (const CheckpointError&) {
    mapping->verify();  // a file cut short while its header was read says so
    throw;
  }
  mapping->verify();
  file->mapping_ = std::move(mapping);
  return file;
}

SafetensorsFile::~SafetensorsFile() = default;

KeySet SafetensorsFile::keys() const {
  KeySet keys;
  for (const auto& item : header_.tensors) keys.insert(item.first);
  return keys;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& key) const {
  auto it = header_.tensors.find(key);
  if (it == header_.tensors.end()) {
    throw CheckpointError(fmt::format("{}: no tensor {} in this file ({} tensors)", path_, detail::shown_key(key),
                                      header_.tensors.size()));
  }
  return it->second;
}

at::Tensor SafetensorsFile::view(const std::string& key) const {
  const SafetensorsEntry& e = entry(key);
  const auto options = at::TensorOptions().dtype(e.dtype);
  // The header is validated, but LibTorch may still refuse a shape it allows
  // (a stride that overflows beside a zero-size dimension).
  try {
    if (e.end == e.begin) return at::empty(e.shape, options);
    char* data = mapping_->data() + header_.data_offset + e.begin;
    if (reinterpret_cast<uintptr_t>(data) % c10::elementSize(e.dtype) != 0) {
      at::Tensor copy = at::empty(e.shape, options);
      std::memcpy(copy.data_ptr(), data, e.end - e.begin);
      mapping_->verify();
      return copy;
    }
    auto keep_alive = mapping_;
    return at::from_blob(data, e.shape, [keep_alive](void*) {}, options);
  } catch (const c10::OutOfMemoryError&) {
    throw;
  } catch (const c10::Error& error) {
    throw CheckpointError(fmt::format("{}: tensor {} ({} of shape {}) cannot be made a tensor: {}", path_, detail::shown_key(key),
                                      e.dtype_name, fmt::join(e.shape, "x"), detail::torch_error_text(error)));
  }
}

at::Tensor SafetensorsFile::get(const std::string& key) const {
  const at::Tensor mapped = view(key);
  at::Tensor out = at::empty_like(mapped);
  if (out.numel() > 0) std::memcpy(out.data_ptr(), mapped.data_ptr(), out.numel() * out.element_size());
  mapping_->verify();
  return out;
}

void SafetensorsFile::verify() const { mapping_->verify(); }

void SafetensorsFile::release(const std::string& key) const {
  auto it = header_.tensors.find(key);
  if (it == header_.tensors.end()) return;
  mapping_->verify();
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t base = reinterpret_cast<uintptr_t>(mapping_->data());
  uintptr_t begin = base + header_.data_offset + it->second.begin;
  uintptr_t end = base + header_.data_offset + it->second.end;
  begin = (begin + page - 1) / page * page;  // only whole pages of this tensor
  end = end / page * page;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

StateDict SafetensorsFile::load_all() const {
  StateDict out;
  for (const auto& item : header_.tensors) out.emplace(item.first, get(item.first));
  return out;
}

// ------------------------------------------------------------------ writing

void save_safetensors(const std::string& path, const StateDict& tensors,
                      const std::map<std::string, std::string>& metadata) {
  for (const auto& [key, value] : metadata) {
    detail::check_json_string(key, path, "__metadata__ key");
    detail::check_json_string(value, path, "__metadata__ value");
  }
  // The reference writer's order: larger dtypes first, then by name, which
  // keeps every tensor aligned for its dtype.
  std::vector<std::pair<std::string, at::Tensor>> order;
  for (const auto& [key, tensor] : tensors) {
    detail::check_json_string(key, path, "key");
    if (!tensor.defined()) throw CheckpointError(fmt::format("{}: tensor '{}' is undefined", path, key));
    if (key == "__metadata__") throw CheckpointError(fmt::format("{}: '__metadata__' is reserved", path));
    if (!find_dtype_name(tensor.scalar_type())) {
      throw CheckpointError(fmt::format("{}: tensor '{}' has dtype {}, which safetensors cannot hold (supported: "
                                        "{}); convert it first",
                                        path, key, c10::toString(tensor.scalar_type()), kSupportedDtypes));
    }
    if (tensor.is_meta()) {
      throw CheckpointError(fmt::format("{}: tensor '{}' is on the meta device and has no data; load or "
                                        "initialise the weights before saving",
                                        path, key));
    }
    if (tensor.layout() != at::kStrided) {
      throw CheckpointError(fmt::format("{}: tensor '{}' is not dense (layout {}); safetensors holds dense "
                                        "tensors: save tensor.to_dense()",
                                        path, key, c10::str(tensor.layout())));
    }
    try {
      order.emplace_back(key, tensor.detach().to(at::kCPU).contiguous());
    } catch (const c10::OutOfMemoryError&) {
      throw;
    } catch (const c10::Error& error) {
      throw CheckpointError(fmt::format("{}: tensor '{}' cannot be copied to the CPU to be written: {}", path, key,
                                        detail::torch_error_text(error)));
    }
  }
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    const auto sa = a.second.element_size(), sb = b.second.element_size();
    return sa != sb ? sa > sb : a.first < b.first;
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [key, tensor] : order) {
    const uint64_t nbytes = tensor.numel() * tensor.element_size();
    header[key] = {{"dtype", safetensors_dtype_name(tensor.scalar_type())},
                   {"shape", tensor.sizes().vec()},
                   {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  uint8_t prefix[8];
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<uint8_t>(n >> (8 * i));

  AtomicFile file(path);
  file.write(prefix, 8);
  file.write(text.data(), text.size());
  for (const auto& item : order) {
    file.write(item.second.data_ptr(), item.second.numel() * item.second.element_size());
  }
  file.commit();
}

}  // namespace d9d::model_state
