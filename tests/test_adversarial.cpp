// The standing adversarial suite: hostile files and faults, generated (not
// stored), each case asserting a typed d9d::Error that names the file and the
// key or field, no crash, and earlier outputs left byte for byte as they were.
//
// Classes: (1) malformed safetensors headers and offsets, (2) hostile index
// files, (3) hostile adapter configs and weights, (4) pathological names,
// (5) a writer killed mid-write, (6) a full disk, (7) pathological regular
// expressions, (8) a file truncated while it is read. Each prints its case count
// ("adversarial: <class>: N cases").
#include "test_util.h"
#include "toy_model.h"

#include <d9d/model_state/io/atomic_file.h>
#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/io/source.h>
#include <d9d/model_state/io/stream.h>
#include <d9d/peft.h>
#include <d9d/peft/hf/merge.h>

#include <ATen/Functions.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <signal.h>
#include <sys/mount.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
namespace hf = d9d::peft::hf;
using d9d_test::kToy;
using d9d_test::read_bytes;
using d9d_test::TempDir;
using nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

/// Every regular file under `dir` (relative name -> bytes): what must not change.
std::map<std::string, std::string> snapshot(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) files[fs::relative(entry.path(), dir).string()] = read_bytes(entry.path().string());
  }
  return files;
}

/// "" when `dir` holds exactly the files of `before`, byte for byte; else
/// which differ (never the bytes themselves, which may be megabytes).
std::string changed_files(const std::string& dir, const std::map<std::string, std::string>& before) {
  const auto now = snapshot(dir);
  std::string changed;
  for (const auto& [name, bytes] : before) {
    auto it = now.find(name);
    if (it == now.end()) changed += " removed:" + name;
    else if (it->second != bytes) changed += " changed:" + name;
  }
  for (const auto& item : now) {
    if (!before.count(item.first)) changed += " added:" + item.first;
  }
  return changed;
}

/// Runs `f`, which must throw a d9d::Error; anything else (another exception,
/// no exception) fails the case. Returns the message ("" when none).
std::string d9d_error(const std::string& label, const std::function<void()>& f) {
  try {
    f();
  } catch (const d9d::Error& e) {
    // D9D_ADVERSARIAL_VERBOSE=1 shows every message, to read them for sense.
    if (std::getenv("D9D_ADVERSARIAL_VERBOSE")) std::cout << label << "\n  " << std::string(e.what()).substr(0, 400) << "\n";
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << label << ": not a d9d::Error: " << e.what();
    return "";
  } catch (...) {
    ADD_FAILURE() << label << ": not a std::exception";
    return "";
  }
  ADD_FAILURE() << label << ": accepted";
  return "";
}

/// `text` as a message shows it: JSON-escaped, so a NUL reads \u0000.
std::string escaped(const std::string& text) { return json(text).dump(); }

// ------------------------------------------------------------ (1) safetensors

/// A safetensors file from its header and data section (header padded to 8 bytes).
std::string compose(const std::string& header_text, const std::string& data) {
  std::string text = header_text;
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + text + data;
}

struct HeaderCase {
  std::string label;
  std::string bytes;
  std::string names;  // a text the message must hold besides the path ("" : the path only)
};

/// Deterministic mutations of a valid file: its length prefix, its length,
/// and its header JSON field by field.
std::vector<HeaderCase> header_cases(const std::string& valid) {
  std::vector<HeaderCase> cases;
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(valid[i]);
  const std::string header_text = valid.substr(8, n), data = valid.substr(8 + n);
  const json header = json::parse(header_text);

  // Every bit of the length prefix.
  for (int bit = 0; bit < 64; ++bit) {
    std::string b = valid;
    b[bit / 8] = static_cast<char>(b[bit / 8] ^ (1 << (bit % 8)));
    cases.push_back({"prefix bit " + std::to_string(bit), b, ""});
  }
  // Every truncation up to the header's end and a few bytes into the data.
  for (size_t len = 0; len < std::min(valid.size(), 8 + n + 12); ++len) {
    cases.push_back({"truncated to " + std::to_string(len), valid.substr(0, len), ""});
  }
  cases.push_back({"one byte short", valid.substr(0, valid.size() - 1), ""});
  cases.push_back({"one byte more", valid + "x", ""});
  // Length prefixes that lie.
  for (uint64_t bad : {uint64_t{0}, uint64_t{1}, uint64_t{7}, n + 8, uint64_t{100} * 1024 * 1024 + 1,
                       std::numeric_limits<uint64_t>::max(), uint64_t{1} << 63}) {
    std::string b = valid;
    for (int i = 0; i < 8; ++i) b[i] = static_cast<char>(bad >> (8 * i));
    cases.push_back({"length prefix " + std::to_string(bad), b, ""});
  }

  const std::vector<std::pair<std::string, json>> wrong_types = {
      {"null", nullptr},    {"true", true},          {"1", 1},          {"-1", -1},
      {"1.5", 1.5},         {"\"x\"", "x"},          {"[]", json::array()}, {"{}", json::object()},
      {"[[1]]", json::parse("[[1]]")}, {"[\"1\",\"2\"]", json::parse("[\"1\",\"2\"]")}};
  const uint64_t u64max = std::numeric_limits<uint64_t>::max();
  for (const auto& item : header.items()) {
    const std::string key = item.key();
    if (key == "__metadata__") continue;
    const json& t = item.value();
    auto with = [&](const std::string& label, const std::function<void(json&)>& change) {
      json h = header;
      change(h[key]);
      cases.push_back({key + ": " + label, compose(h.dump(), data), "'" + key + "'"});
    };
    // Named copies: clang 14 cannot capture structured bindings.
    for (const auto& wrong : wrong_types) {
      const json& v = wrong.second;
      with("entry = " + wrong.first, [&](json& e) { e = v; });
    }
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      with(std::string("no ") + field, [&](json& e) { e.erase(field); });
      for (const auto& wrong : wrong_types) {
        const json& v = wrong.second;
        // A shape of [] is a valid scalar shape; it is mutated below instead.
        if (std::string(field) == "shape" && v.is_array() && v.empty()) continue;
        with(std::string(field) + " = " + wrong.first, [&](json& e) { e[field] = v; });
      }
    }
    const std::string dtype = t["dtype"];
    const size_t itemsize = dtype == "F64" || dtype == "I64" ? 8 : dtype == "F32" || dtype == "I32" ? 4
                            : dtype == "F16" || dtype == "BF16" || dtype == "I16"                  ? 2
                                                                                                   : 1;
    for (const char* other : {"F8_E4M3", "f32", "", "F32 ", "U16", "Q4", "C64", "STRING"}) {
      with(std::string("dtype ") + escaped(other), [&](json& e) { e["dtype"] = other; });
    }
    const std::map<std::string, size_t> sizes = {{"F64", 8}, {"I64", 8}, {"F32", 4}, {"I32", 4}, {"F16", 2},
                                                 {"BF16", 2}, {"I16", 2}, {"I8", 1},  {"U8", 1},  {"BOOL", 1}};
    for (const auto& sized : sizes) {
      const std::string& name = sized.first;
      if (sized.second != itemsize) with("dtype " + name, [&](json& e) { e["dtype"] = name; });
    }
    const uint64_t begin = t["data_offsets"][0], end = t["data_offsets"][1];
    const std::vector<json> shapes = {
        json::array(),  // a scalar: one element, not what the offsets span
        json::parse("[-1]"),
        json::parse("[2,-3]"),
        json::parse("[1.5]"),
        json::parse("[null]"),
        json::parse("[18446744073709551616]"),
        json::array({uint64_t{1} << 63}),
        json::array({u64max}),
        json::array({uint64_t{1} << 62, 4}),
        json::array({uint64_t{1} << 62, 1}),
        json::array({uint64_t{1} << 32, uint64_t{1} << 32}),
        json::array({uint64_t{1} << 33, uint64_t{1} << 32, 0}),
        json::array({uint64_t{1} << 61, 1}),
        json::array({(end - begin) / itemsize + 1}),
        json::array({(end - begin) / itemsize, 2}),
        json::array({3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
                     3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3}),
    };
    for (const auto& shape : shapes) with("shape " + shape.dump(), [&](json& e) { e["shape"] = shape; });
    const std::vector<json> offsets = {
        json::parse("[-1, 0]"),
        json::array({begin, -1}),
        json::array({end, begin}),
        json::array({begin, u64max}),
        json::array({u64max, u64max}),
        json::array({begin, uint64_t{1} << 63}),
        json::parse("[1e30, 2e30]"),
        json::array({begin + 1, end + 1}),
        json::array({begin, end + 1}),
        json::array({begin, end - 1}),
        json::array({begin + itemsize, end + itemsize}),
        json::array({begin}),
        json::array({begin, end, end}),
        json::array({static_cast<double>(begin), static_cast<double>(end)}),
    };
    for (const auto& o : offsets) {
      if (o.size() == 2 && o[0].is_number_unsigned() && o[1].is_number_unsigned() && o[0] == begin && o[1] == end) {
        continue;
      }
      with("data_offsets " + o.dump(), [&](json& e) { e["data_offsets"] = o; });
    }
  }
  // The whole header.
  for (const auto& [label, v] : wrong_types) {
    if (v.is_object()) continue;  // {} below
    cases.push_back({"header = " + label, compose(v.dump(), data), ""});
  }
  cases.push_back({"header = {} with data", compose("{}", data), ""});
  for (const auto& [label, v] : wrong_types) {
    if (v.is_object() && v.empty()) continue;  // an empty metadata object is valid
    json h = header;
    h["__metadata__"] = v;
    cases.push_back({"__metadata__ = " + label, compose(h.dump(), data), "__metadata__"});
  }
  for (const auto& [label, v] : wrong_types) {
    if (v.is_string()) continue;
    json h = header;
    h["__metadata__"] = {{"format", v}};
    cases.push_back({"__metadata__.format = " + label, compose(h.dump(), data), "__metadata__"});
  }
  // Duplicate keys (only text can hold them).
  {
    const std::string first = "a";
    const std::string entry = escaped(first) + ":" + header[first].dump();
    cases.push_back({"duplicate " + first, compose("{" + entry + "," + header_text.substr(1), data), "'a'"});
    cases.push_back({"duplicate __metadata__",
                     compose("{\"__metadata__\":{},\"__metadata__\":{}," + header_text.substr(1), data),
                     "__metadata__"});
  }
  // Text that is not the JSON it claims.
  const std::vector<std::pair<std::string, std::string>> texts = {
      {"leading space", " " + header_text},
      {"truncated JSON", header_text.substr(0, header_text.size() / 2)},
      {"trailing garbage", header_text + "}"},
      {"invalid UTF-8 key", "{\"\xff\xfe\":{}," + header_text.substr(1)},
      {"NUL inside", header_text.substr(0, 5) + std::string(1, '\0') + header_text.substr(6)},
      {"deeply nested", "{\"__metadata__\":" + std::string(100000, '[') + std::string(100000, ']') + "}"},
      {"deeply nested objects", "{\"a\":" + [] {
         std::string s;
         for (int i = 0; i < 100000; ++i) s += "{\"a\":";
         s += "1";
         s.append(100000, '}');
         return s;
       }() + "}"},
      {"comments", "/*x*/" + header_text},
  };
  for (const auto& [label, text] : texts) cases.push_back({label, compose(text, data), ""});
  return cases;
}

/// A valid small safetensors file: three dtypes, metadata.
std::string valid_safetensors(const std::string& path) {
  ms::StateDict tensors;
  tensors.emplace("a", at::arange(6, at::kFloat).reshape({2, 3}));
  tensors.emplace("b", at::arange(2, at::kLong));
  tensors.emplace("c", at::ones({3}, at::kHalf));
  ms::save_safetensors(path, tensors, {{"format", "pt"}});
  return read_bytes(path);
}

TEST(Adversarial, MalformedSafetensorsHeadersAndOffsets) {
  TempDir tmp;
  const std::string valid_path = tmp / "valid.safetensors";
  const std::string valid = valid_safetensors(valid_path);
  const std::string path = tmp / "hostile.safetensors";
  size_t count = 0;
  for (const auto& c : header_cases(valid)) {
    ++count;
    write_bytes(path, c.bytes);
    const std::string message = d9d_error(c.label, [&] { ms::SafetensorsFile::open(path); });
    if (message.empty()) continue;
    EXPECT_THAT(message, HasSubstr(path)) << c.label;
    if (!c.names.empty()) EXPECT_THAT(message, HasSubstr(c.names)) << c.label;
    // No message contradicts itself about an overflowed size.
    EXPECT_THAT(message, Not(HasSubstr("needs 0 bytes"))) << c.label;
  }

  // Random mutations of the header text and prefix, from a fixed seed: an
  // error naming the file, or a file whose every tensor reads whole.
  std::mt19937 rng(20240611);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(valid[i]);
  const int random_cases = 400;
  for (int i = 0; i < random_cases; ++i) {
    std::string b = valid;
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % (8 + n);
      const uint32_t kind = rng() % 3;
      if (kind == 0) b[at] = static_cast<char>(rng() % 256);
      else if (kind == 1) b[at] = "{}[]\",:0123456789-e."[rng() % 20];
      else b[at] = static_cast<char>(b[at] ^ (1 << (rng() % 8)));
    }
    ++count;
    write_bytes(path, b);
    try {
      const auto file = ms::SafetensorsFile::open(path);
      uint64_t bytes = 0;
      for (const auto& key : file->keys()) {
        const at::Tensor t = file->get(key);
        bytes += static_cast<uint64_t>(t.numel()) * t.element_size();
      }
      EXPECT_EQ(bytes, b.size() - file->header().data_offset) << "random case " << i;
    } catch (const d9d::Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(path)) << "random case " << i;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "random case " << i << ": not a d9d::Error: " << e.what();
    }
  }
  EXPECT_EQ(read_bytes(valid_path), valid);
  std::cout << "adversarial: safetensors headers: " << count << " cases\n";
}

// ------------------------------------------------------------------ (2) index

/// The toy base as two shards and an index in `dir`; returns the index JSON.
json write_sharded_toy(const std::string& dir) {
  const auto base = ms::SafetensorsFile::open(kToy + "/model.safetensors");
  ms::StateDict halves[2];
  json index = {{"metadata", json::object()}, {"weight_map", json::object()}};
  size_t i = 0;
  const ms::KeySet keys = base->keys();
  for (const auto& key : keys) {
    const int half = i++ < keys.size() / 2 ? 0 : 1;
    halves[half].emplace(key, base->get(key));
    index["weight_map"][key] = "model-0000" + std::to_string(half + 1) + "-of-00002.safetensors";
  }
  fs::create_directories(dir);
  for (int h = 0; h < 2; ++h) {
    ms::save_safetensors(dir + "/model-0000" + std::to_string(h + 1) + "-of-00002.safetensors", halves[h],
                         {{"format", "pt"}});
  }
  write_bytes(dir + "/model.safetensors.index.json", index.dump(2));
  return index;
}

TEST(Adversarial, HostileIndexFiles) {
  TempDir tmp;
  const std::string base = tmp / "base", out = tmp / "out";
  const std::string adapter = kToy + "/adapters/lora_attn_r4";
  const json valid = write_sharded_toy(base);
  fs::create_directories(base + "/a-directory.safetensors");
  const std::string index_path = base + "/model.safetensors.index.json";
  // A valid merged checkpoint already in `out`: every refused merge must leave it.
  hf::merge_adapter_into_checkpoint(base, adapter, out, 1.0, ms::no_progress());
  const auto out_before = snapshot(out);
  const auto base_before = snapshot(base);
  const std::string key = valid["weight_map"].items().begin().key();
  const std::string shard1 = valid["weight_map"][key];

  struct IndexCase {
    std::string label, text, names;
  };
  std::vector<IndexCase> cases;
  auto mapped = [&](const json& shard, const std::string& names) {
    json j = valid;
    j["weight_map"][key] = shard;
    cases.push_back({"weight_map[key] = " + shard.dump(), j.dump(), names});
  };
  for (const json& v : {json(nullptr), json(1), json(true), json(1.5), json::array(), json::object(),
                        json::array({shard1})}) {
    mapped(v, key);
  }
  const std::vector<std::string> names = {
      "../" + shard1,
      "../../../../../../etc/passwd",
      "/etc/passwd",
      base + "/" + shard1,
      "sub/" + shard1,
      "a\\" + shard1,
      "",
      ".",
      "..",
      shard1 + std::string(1, '\0') + "x",
      std::string(1, '\0'),
      shard1 + "\n",
      "\t" + shard1,
      shard1 + "\x7f",
      "\x1b[31m" + shard1,
      "missing.safetensors",
      "model.safetensors.index.json",
      "a-directory.safetensors",
      "model-00002-of-00002.safetensors",  // the other shard, which lacks the key
  };
  for (const auto& name : names) mapped(name, key);
  // Keys themselves: a NUL, and a key no shard holds.
  {
    json j = valid;
    j["weight_map"][key + std::string(1, '\0') + "x"] = shard1;
    cases.push_back({"key with a NUL", j.dump(), "\\u0000"});
  }
  // Two names that reach one file, which made a merge write two outputs to one path.
  {
    json j = valid;
    bool first = true;
    for (auto& item : j["weight_map"].items()) {
      if (item.value() == shard1 && !first) item.value() = shard1 + std::string(1, '\0') + "x";
      first = false;
    }
    cases.push_back({"NUL alias of a shard", j.dump(), "\\u0000"});
  }
  auto whole = [&](const std::string& label, const json& j) { cases.push_back({label, j.dump(), ""}); };
  for (const json& v : {json(nullptr), json(1), json("x"), json::array()}) {
    json j = valid;
    j["weight_map"] = v;
    whole("weight_map = " + v.dump(), j);
  }
  {
    json j = valid;
    j.erase("weight_map");
    whole("no weight_map", j);
  }
  for (const json& v : {json(nullptr), json(1), json::array()}) {
    json j = valid;
    j["metadata"] = v;
    whole("metadata = " + v.dump(), j);
  }
  for (const json& v : {json(-1), json("1"), json(1.5), json::array()}) {
    json j = valid;
    j["metadata"]["total_size"] = v;
    whole("total_size = " + v.dump(), j);
  }
  {
    json j = valid;
    j["weights"] = json::object();
    whole("unknown field", j);
  }
  whole("a list", json::array({valid}));
  whole("a string", json("model.safetensors"));
  cases.push_back({"not JSON", "weight_map: {}", ""});
  cases.push_back({"empty", "", ""});
  cases.push_back({"truncated", valid.dump().substr(0, valid.dump().size() / 2), ""});
  cases.push_back({"deeply nested", "{\"weight_map\":" + std::string(100000, '[') + std::string(100000, ']') + "}", ""});

  for (const auto& c : cases) {
    write_bytes(index_path, c.text);
    const std::string read = d9d_error(c.label + " (open)", [&] { ms::open_checkpoint(base); });
    if (!read.empty()) {
      EXPECT_THAT(read, HasSubstr(index_path)) << c.label;
      if (!c.names.empty()) EXPECT_THAT(read, HasSubstr(c.names)) << c.label;
    }
    const std::string merged = d9d_error(c.label + " (merge)", [&] {
      hf::merge_adapter_into_checkpoint(base, adapter, out, 1.0, ms::no_progress());
    });
    if (!merged.empty()) EXPECT_THAT(merged, HasSubstr(index_path)) << c.label;
    EXPECT_EQ(changed_files(out, out_before), "") << c.label << ": the existing output changed";
  }
  write_bytes(index_path, valid.dump(2));
  EXPECT_EQ(changed_files(base, base_before), "") << "the base directory changed";
  std::cout << "adversarial: index files: " << cases.size() << " cases\n";
}

TEST(Adversarial, SaveOverAHostileOldIndexKeepsTheNewCheckpoint) {
  // The old index's shard names are removed once a new checkpoint is in
  // place. "model.safetensors\0x" would have reached the new
  // model.safetensors through the NUL and deleted it.
  TempDir tmp;
  write_bytes(tmp / "model.safetensors.index.json",
              json({{"weight_map", {{"w", std::string("model.safetensors") + '\0' + "x"}}}}).dump());
  toy::Toy model;
  ms::save_model_state(tmp.str(), *ms::identity_mapper_from_module(*model), *model, d9d_test::quiet_save());
  ASSERT_TRUE(fs::exists(tmp / "model.safetensors"));
  EXPECT_EQ(ms::open_checkpoint(tmp / "model.safetensors")->keys().size(), model->named_parameters().size() +
                                                                                 model->named_buffers().size());
}

// -------------------------------------------------------------- (3) adapters

/// A copy of the lora_attn_r4 fixture in `dir` with `config` and `tensors`.
void write_adapter(const std::string& dir, const std::string& config_text, const ms::StateDict& tensors) {
  fs::create_directories(dir);
  write_bytes(dir + "/adapter_config.json", config_text);
  ms::save_safetensors(dir + "/adapter_model.safetensors", tensors);
}

// Placeholders for JSON numbers out of double's range, which json cannot hold.
const json kHuge = "@1e999@", kMinusHuge = "@-1e999@";

std::string with_huge_numbers(std::string text) {
  for (const auto& [marker, number] : {std::pair<std::string, std::string>{"\"@1e999@\"", "1e999"},
                                       std::pair<std::string, std::string>{"\"@-1e999@\"", "-1e999"}}) {
    for (size_t at; (at = text.find(marker)) != std::string::npos;) text.replace(at, marker.size(), number);
  }
  return text;
}

TEST(Adversarial, HostileAdapterConfigsAndWeights) {
  TempDir tmp;
  const std::string fixture = kToy + "/adapters/lora_attn_r4";
  const std::string base = kToy + "/model.safetensors", out = tmp / "out";
  const json config = json::parse(read_bytes(fixture + "/adapter_config.json"));
  const ms::StateDict weights = ms::SafetensorsFile::open(fixture + "/adapter_model.safetensors")->load_all();
  hf::merge_adapter_into_checkpoint(base, fixture, out, 1.0, ms::no_progress());
  const auto out_before = snapshot(out);
  size_t count = 0;
  auto refused = [&](const std::string& label, const std::string& dir, const std::vector<std::string>& names,
                     bool allow_non_finite = false) {
    ++count;
    hf::MergeOptions options;
    options.progress = ms::no_progress();
    options.allow_non_finite = allow_non_finite;
    const std::string message =
        d9d_error(label, [&] { hf::merge_adapter_into_checkpoint(base, dir, out, options); });
    for (const auto& name : names) {
      if (!message.empty()) EXPECT_THAT(message, HasSubstr(name)) << label;
    }
    EXPECT_EQ(changed_files(out, out_before), "") << label << ": the existing output changed";
    return message;
  };

  // Configs: wrong types and values for each field.
  const std::vector<std::pair<std::string, std::vector<json>>> fields = {
      {"r", {"4", 4.5, 0, -1, nullptr, true, json::array(), json::object(), kHuge}},
      {"lora_alpha", {"8", -1, 0, nullptr, true, json::array(), kHuge, kMinusHuge}},
      {"lora_dropout", {1.0, -0.1, "0", nullptr, kHuge, json::array()}},
      {"target_modules", {1, json::object(), json::array({1}), "all-linear", "ALL-Linear", "(", json::array({nullptr}),
                          nullptr}},
      {"exclude_modules", {1, json::array({2}), "[", json::object()}},
      {"use_rslora", {"yes", 1, nullptr, json::array()}},
      {"use_dora", {"no", 0, nullptr}},
      {"init_lora_weights", {"corda", "pissa_niter_0", "pissa_niter_", "olora2", 2, nullptr, json::array()}},
      {"rank_pattern", {json::array(), "x", json::parse(R"({"q_proj": 0})"), json::parse(R"({"q_proj": "4"})"),
                        json::parse(R"({"(": 4})"), json::parse(R"({"q_proj": 1.5})")}},
      {"alpha_pattern", {json::array(), 1, json::parse(R"({"q_proj": 0})"), json({{"q_proj", kHuge}}),
                         json::parse(R"({"q_proj": "x"})"), json::parse(R"({"[": 2})")}},
      {"peft_type", {"NOPE", "lora", 1, nullptr, json::array()}},
      {"bias", {"all", "lora_only", 1}},
      {"fan_in_fan_out", {true}},
      {"modules_to_save", {json::array({"lm_head"})}},
      {"layers_to_transform", {json::array({0})}},
      {"use_dora_typo", {true}},
      {"task_type", {5, json::array()}},
      {"base_model_name_or_path", {5, json::object()}},
  };
  int n = 0;
  for (const auto& [field, values] : fields) {
    for (const auto& value : values) {
      json c = config;
      c[field] = value;
      const std::string text = with_huge_numbers(c.dump());
      const std::string dir = tmp / ("config-" + std::to_string(++n));
      write_adapter(dir, text, weights);
      // A number out of double's range fails the JSON reader, which cannot say where.
      const bool huge = text != c.dump();
      refused(field + " = " + value.dump(), dir,
              huge ? std::vector<std::string>{dir + "/adapter_config.json", "1e999"}
                   : std::vector<std::string>{dir + "/adapter_config.json", field});
    }
  }
  for (const auto& [label, text] : std::vector<std::pair<std::string, std::string>>{
           {"a list", "[]"}, {"not JSON", "{"}, {"empty", ""}, {"no peft_type", "{\"r\": 4}"},
           {"deeply nested", "{\"x\":" + std::string(100000, '[') + std::string(100000, ']') + "}"}}) {
    const std::string dir = tmp / ("config-" + std::to_string(++n));
    write_adapter(dir, text, weights);
    refused("config " + label, dir, {dir + "/adapter_config.json"});
  }
  // "all-linear" says what to do.
  {
    json c = config;
    c["target_modules"] = "all-linear";
    const std::string dir = tmp / ("config-" + std::to_string(++n));
    write_adapter(dir, c.dump(), weights);
    const std::string message = refused("all-linear", dir, {dir + "/adapter_config.json: target_modules"});
    EXPECT_THAT(message, HasSubstr("PEFT's shorthand"));
    EXPECT_THAT(message, HasSubstr("list the module names explicitly"));
  }

  // Weights.
  const std::string a_key = "base_model.model.layers.0.attention.q_proj.lora_A.weight";
  const std::string b_key = "base_model.model.layers.0.attention.q_proj.lora_B.weight";
  ASSERT_TRUE(weights.count(a_key) && weights.count(b_key));
  auto with_weights = [&](const std::string& label, const std::function<void(ms::StateDict&)>& change,
                          const std::vector<std::string>& names, bool allow_non_finite = false) {
    ms::StateDict w;
    for (const auto& [k, t] : weights) w.emplace(k, t.clone());
    change(w);
    const std::string dir = tmp / ("weights-" + std::to_string(++n));
    write_adapter(dir, config.dump(), w);
    std::vector<std::string> with_file = names;
    with_file.push_back(dir + "/adapter_model.safetensors");
    return refused(label, dir, with_file, allow_non_finite);
  };
  with_weights("lora_A transposed", [&](ms::StateDict& w) { w[a_key] = w[a_key].t().contiguous(); }, {a_key});
  with_weights("lora_A rank 3", [&](ms::StateDict& w) { w[a_key] = w[a_key].narrow(0, 0, 3).contiguous(); }, {"q_proj"});
  with_weights("lora_A 3-D", [&](ms::StateDict& w) { w[a_key] = w[a_key].unsqueeze(0).contiguous(); }, {a_key});
  with_weights("lora_A 1-D", [&](ms::StateDict& w) { w[a_key] = w[a_key].flatten().contiguous(); }, {a_key});
  with_weights("lora_B wrong out", [&](ms::StateDict& w) { w[b_key] = at::zeros({7, 4}); }, {b_key});
  with_weights("no lora_B", [&](ms::StateDict& w) { w.erase(b_key); }, {"q_proj"});
  with_weights("no lora_A", [&](ms::StateDict& w) { w.erase(a_key); }, {"q_proj"});
  with_weights("lora_A int64", [&](ms::StateDict& w) { w[a_key] = w[a_key].to(at::kLong); }, {a_key});
  with_weights("lora_A bool", [&](ms::StateDict& w) { w[a_key] = w[a_key] > 0; }, {a_key});
  with_weights("a module the base lacks",
               [&](ms::StateDict& w) {
                 w["base_model.model.layers.9.attention.q_proj.lora_A.weight"] = w[a_key];
                 w["base_model.model.layers.9.attention.q_proj.lora_B.weight"] = w[b_key];
               },
               {"layers.9.attention.q_proj"});
  with_weights("no tensors", [&](ms::StateDict& w) { w.clear(); }, {});
  with_weights("an unknown tensor", [&](ms::StateDict& w) { w["base_model.model.layers.0.attention.q_proj.lora_C.weight"] = w[a_key]; },
               {"lora_C"});
  for (const double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                           -std::numeric_limits<double>::infinity()}) {
    for (const std::string& k : {a_key, b_key}) {
      with_weights(k + " holds " + std::to_string(bad), [&](ms::StateDict& w) { w[k].view(-1)[1] = bad; },
                   {k, "--allow-non-finite"});
    }
  }
  // Asked for, a non-finite adapter merges (into a fresh directory).
  {
    ms::StateDict w;
    for (const auto& [k, t] : weights) w.emplace(k, t.clone());
    w[b_key].view(-1)[1] = std::numeric_limits<double>::quiet_NaN();
    const std::string dir = tmp / "nan-allowed";
    write_adapter(dir, config.dump(), w);
    hf::MergeOptions options;
    options.progress = ms::no_progress();
    options.allow_non_finite = true;
    hf::merge_adapter_into_checkpoint(base, dir, tmp / "nan-out", options);
    EXPECT_TRUE(at::isnan(ms::open_checkpoint(tmp / "nan-out")->read("layers.0.attention.q_proj.weight")).any().item<bool>());
  }
  // A weights file that is not one.
  {
    const std::string dir = tmp / ("weights-" + std::to_string(++n));
    write_adapter(dir, config.dump(), weights);
    const std::string file = dir + "/adapter_model.safetensors";
    const std::string bytes = read_bytes(file);
    write_bytes(file, bytes.substr(0, bytes.size() / 2));
    refused("truncated weights", dir, {file});
  }
  std::cout << "adversarial: adapter configs and weights: " << count << " cases\n";
}

// ----------------------------------------------------------------- (4) names

TEST(Adversarial, PathologicalNames) {
  TempDir tmp;
  size_t count = 0;
  const std::string long_name = "layers." + std::string(200000, 'x') + ".weight";
  const std::string nul_name = std::string("layers.0.attention.q_proj.weight") + '\0' + "x";
  const std::string unicode = "слой.0.权重.🙂.weight";
  const std::vector<std::pair<std::string, std::string>> names = {
      {"200,000 characters", long_name}, {"NUL", nul_name}, {"unicode", unicode}, {"empty", ""},
      {"only dots", "..."}, {"newline", "a\nb"}};
  for (const auto& [label, name] : names) {
    ++count;
    // A NUL in a key must not end the message early (what() is a C string).
    auto check = [&, name = name, label = label](const std::string& message) {
      if (name.find('\0') != std::string::npos) EXPECT_THAT(message, HasSubstr("\\u0000x")) << label;
    };
    // Round trip through safetensors: the name comes back exactly.
    const std::string file = tmp / "names.safetensors";
    ms::StateDict tensors;
    tensors.emplace(name, at::ones({2}));
    ms::save_safetensors(file, tensors);
    const auto back = ms::SafetensorsFile::open(file);
    EXPECT_EQ(back->keys(), ms::KeySet{name}) << label;

    // Into a model (identity and LoRA mappers): an extra key is reported, not dropped.
    ms::StateDict state = ms::SafetensorsFile::open(kToy + "/model.safetensors")->load_all();
    state.emplace(name, at::ones({2}));
    const std::string checkpoint = tmp / "checkpoint.safetensors";
    ms::save_safetensors(checkpoint, state);
    {
      toy::Toy model;
      check(d9d_error(label + " (identity load)", [&] {
        ms::load_model_state(checkpoint, *ms::identity_mapper_from_module(*model), *model, d9d_test::quiet());
      }));
    }
    {
      toy::Toy model;
      d9d::peft::LoRA lora({".*_proj", d9d::peft::LoRAParameters().r(2).alpha(4)});
      const auto mapper = d9d::peft::inject_peft_and_freeze(lora, model);
      check(d9d_error(label + " (LoRA load)",
                      [&] { ms::load_model_state(checkpoint, *mapper, *model, d9d_test::quiet()); }));
    }
    // As an adapter key: refused, naming the adapter.
    {
      ++count;
      ms::StateDict w = ms::SafetensorsFile::open(kToy + "/adapters/lora_attn_r4/adapter_model.safetensors")->load_all();
      w.emplace("base_model.model." + name + ".lora_A.weight", at::ones({4, 16}));
      w.emplace("base_model.model." + name + ".lora_B.weight", at::ones({16, 4}));
      const std::string dir = tmp / "adapter";
      fs::remove_all(dir);
      write_adapter(dir, read_bytes(kToy + "/adapters/lora_attn_r4/adapter_config.json"), w);
      check(d9d_error(label + " (merge)", [&] {
        hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", dir, tmp / "merged", 1.0, ms::no_progress());
      }));
      EXPECT_FALSE(fs::exists(tmp / "merged")) << label;
      toy::Toy model;
      ms::load_model_state(kToy + "/model.safetensors", *ms::identity_mapper_from_module(*model), *model,
                           d9d_test::quiet());
      check(d9d_error(label + " (load_adapter)", [&] { hf::load_adapter(*model, dir); }));
    }
  }
  // A name that is not UTF-8 cannot be written as a safetensors key.
  {
    ++count;
    ms::StateDict tensors;
    tensors.emplace("\xff\xfe", at::ones({1}));
    const std::string file = tmp / "invalid.safetensors";
    EXPECT_THAT(d9d_error("invalid UTF-8 key", [&] { ms::save_safetensors(file, tensors); }),
                HasSubstr("is not valid UTF-8"));
    EXPECT_FALSE(fs::exists(file));
  }
  std::cout << "adversarial: pathological names: " << count << " cases\n";
}

// ------------------------------------------------- (7) pathological patterns

TEST(Adversarial, PathologicalPatterns) {
  // Patterns that make a backtracking matcher take exponential time or
  // overflow its stack, against long names, through every place a pattern
  // is read: a d9d JSON config, adapter_config.json selectors and
  // rank_pattern keys. Each either matches in linear time or is refused at
  // parse time naming the field.
  size_t count = 0;
  const std::vector<std::string> explosive = {"(x|y)*z", "(a+)+$", "(a|aa)*b", "(a*)*b", "(.*a){20}", "((a|b)+)+c",
                                              "(\\w+\\s?)*!", "([a-z]+)*[0-9]"};
  // Names each pattern almost matches (the last character fails them all):
  // the worst case for backtracking.
  const std::vector<std::string> names = {std::string(200000, 'x') + "#", std::string(64, 'a') + "#",
                                          std::string(100000, 'a') + "!#", "layers.0." + std::string(5000, 'b') + "#"};
  // And where they do match, they say so.
  EXPECT_TRUE(d9d::peft::Pattern("(a+)+$", "p").full_match(std::string(100000, 'a')));
  EXPECT_TRUE(d9d::peft::Pattern("(x|y)*z", "p").full_match(std::string(200000, 'y') + "z"));
  for (const auto& pattern : explosive) {
    for (const auto& name : names) {
      ++count;
      const d9d::peft::Pattern p(pattern, "module_name_pattern");
      EXPECT_FALSE(p.full_match(name)) << pattern << " on a " << name.size() << "-character name";
    }
    // Through a PEFT config's target_modules and rank_pattern.
    ++count;
    const auto config = hf::parse_lora_config(
        json{{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"target_modules", pattern},
             {"rank_pattern", {{pattern, 2}}}},
        "adapter_config.json");
    for (const auto& name : names) EXPECT_FALSE(config.select(name).has_value()) << pattern;
    // Through a d9d LoRA method, injecting into a model with a long module name.
    ++count;
    torch::nn::Module model;
    model.register_module(std::string(100000, 'x'), d9d::nn::Linear(4, 4));
    EXPECT_THAT(d9d_error("inject " + pattern,
                          [&] {
                            d9d::peft::LoRA lora({pattern, d9d::peft::LoRAParameters().r(2).alpha(4)});
                            lora.inject(model);
                          }),
                HasSubstr("matches no module"));
  }
  // Syntax a linear-time engine cannot run, or that is simply broken: refused
  // when read, naming the field, never at match time.
  const std::vector<std::string> refused = {"(?=a)a", "(?!lm_head).*", ".*(?<=proj)", "(?<!x)y", "(a)\\1",
                                            "(?P<n>a)(?P=n)", "(?>a+)", "a*+", "a{1001}", "(?(1)a|b)",
                                            "lm_head\\Z", "[", "(", "*a", "a{2,1}", std::string(3000, '(')};
  for (const auto& pattern : refused) {
    ++count;
    EXPECT_THAT(d9d_error("d9d JSON " + pattern,
                          [&] {
                            d9d::peft::parse_peft_config(json{{"kind", "full_tune"}, {"module_name_pattern", pattern}}.dump());
                          }),
                HasSubstr("module_name_pattern: invalid regular expression"))
        << pattern;
    ++count;
    EXPECT_THAT(d9d_error("target_modules " + pattern,
                          [&] {
                            hf::parse_lora_config(json{{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8},
                                                       {"target_modules", pattern}},
                                                  "adapter_config.json");
                          }),
                HasSubstr("adapter_config.json: target_modules: invalid regular expression"))
        << pattern;
  }
  std::cout << "adversarial: pathological patterns: " << count << " cases\n";
}

// ------------------------------------------- (8) a file truncated while read

TEST(Adversarial, FilesTruncatedWhileTheyAreRead) {
  // Another process cuts a file short between its open (validated) and the
  // reads: at every tensor boundary and inside tensors, through get, view +
  // verify, the loader and the merge. Each is a CheckpointError naming the
  // file; the process survives (an unguarded mapping dies of SIGBUS).
  TempDir tmp;
  size_t count = 0;
  const std::string path = tmp / "model.safetensors";
  ms::StateDict state;
  for (int i = 0; i < 6; ++i) state.emplace("t" + std::to_string(i), at::randn({2048 + 512 * i}));
  const std::string expected = ": the file was truncated or replaced while it was read";
  for (int cut = 0; cut < 12; ++cut) {
    ms::save_safetensors(path, state);
    const auto file = ms::SafetensorsFile::open(path);
    const uint64_t size = fs::file_size(path);
    const uint64_t at = file->header().data_offset + (size - file->header().data_offset) * cut / 12;
    fs::resize_file(path, at);
    ++count;
    // Reading every tensor must either give the saved data or say the file changed.
    std::string error;
    for (const auto& [key, saved] : state) {
      try {
        EXPECT_TRUE(at::equal(file->get(key), saved)) << key << " cut at " << at;
      } catch (const ms::CheckpointError& e) {
        error = e.what();
      }
    }
    EXPECT_THAT(error, HasSubstr(path + expected)) << "cut at " << at;
    // Views read as zeros past the cut, and verify() reports it.
    EXPECT_THAT(d9d_error("verify", [&] { file->verify(); }), HasSubstr(path + expected));
  }
  // The merge: a shard cut short while merging leaves no output.
  {
    ++count;
    const std::string base = tmp / "base.safetensors";
    fs::copy_file(kToy + "/model.safetensors", base, fs::copy_options::overwrite_existing);
    auto truncating = [&](const ms::ProgressInfo& p) {
      if (p.done == 2) fs::resize_file(base, fs::file_size(base) / 3);
    };
    EXPECT_THAT(d9d_error("merge", [&] {
                  hf::merge_adapter_into_checkpoint(base, kToy + "/adapters/lora_all_linear_r8", tmp / "merged", 1.0,
                                                    truncating);
                }),
                HasSubstr(base + expected));
    EXPECT_FALSE(fs::exists(tmp / "merged"));
  }
  std::cout << "adversarial: files truncated while read: " << count << " cases\n";
}

// --------------------------------------------------------- (5) killed writer

/// The temporary files of our writers in `dir`.
std::vector<std::string> partial_files(const std::string& dir) {
  std::vector<std::string> found;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.find(".tmp-") != std::string::npos) found.push_back(name);
  }
  return found;
}

/// Forks a child running `write`, kills it with SIGKILL once a temporary file
/// in `dir` has grown past `min_bytes`. False when the child finished first.
bool kill_mid_write(const std::string& dir, uint64_t min_bytes, const std::function<void()>& write) {
  const pid_t child = ::fork();
  if (child == 0) {
    try {
      write();
    } catch (...) {
      ::_exit(2);
    }
    ::_exit(0);
  }
  bool killed = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (::waitpid(child, &status, WNOHANG) == child) return false;
    std::error_code ec;
    for (const auto& name : partial_files(dir)) {
      if (fs::file_size(fs::path(dir) / name, ec) >= min_bytes && !ec) killed = true;
    }
    if (killed) break;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  return killed && WIFSIGNALED(status);
}

TEST(Adversarial, KilledWriterLeavesTheOldFile) {
  TempDir tmp;
  size_t count = 0;
  const std::string path = tmp / "model.safetensors";
  ms::StateDict small;
  small.emplace("w", at::arange(10, at::kFloat));
  ms::save_safetensors(path, small);
  const std::string old = read_bytes(path);

  // save_safetensors of a large checkpoint over it, killed mid-write (the
  // tensors are made before the fork: the child only writes).
  bool killed = false;
  for (int64_t mb = 64; mb <= 1024 && !killed; mb *= 2) {
    ms::StateDict large;
    for (int i = 0; i < 8; ++i) large.emplace("t" + std::to_string(i), at::ones({mb * 1024 * 1024 / 32}));
    killed = kill_mid_write(tmp.str(), 1 << 20, [&] { ms::save_safetensors(path, large); });
    if (!killed) ms::save_safetensors(path, small);  // it finished: put the old file back and write more
  }
  ASSERT_TRUE(killed) << "the writer finished before it could be killed";
  ++count;
  EXPECT_EQ(read_bytes(path), old);
  ASSERT_EQ(partial_files(tmp.str()).size(), 1u);
  // The next write removes the dead writer's partial file.
  ms::save_safetensors(tmp / "other.safetensors", small);
  EXPECT_TRUE(partial_files(tmp.str()).empty());
  EXPECT_EQ(read_bytes(path), old);

  // The atomic writer itself, killed between writes.
  const std::string notes = tmp / "notes.txt";
  ms::write_file_atomically(notes, "old notes");
  ASSERT_TRUE(kill_mid_write(tmp.str(), 1, [&] {
    ms::AtomicFile file(notes);
    const std::string chunk(4096, 'n');
    for (;;) {
      file.write(chunk.data(), chunk.size());
      ::usleep(1000);
    }
  }));
  ++count;
  EXPECT_EQ(read_bytes(notes), "old notes");
  ms::write_file_atomically(notes, "new notes");
  EXPECT_TRUE(partial_files(tmp.str()).empty());
  EXPECT_EQ(read_bytes(notes), "new notes");

  // A sharded save over an existing sharded checkpoint, killed mid-write.
  const std::string dir = tmp / "sharded";
  write_sharded_toy(dir);
  const auto before = snapshot(dir);
  torch::nn::Linear big(torch::nn::LinearOptions(4096, 4096));
  bool sharded_killed = false;
  for (int attempt = 0; attempt < 3 && !sharded_killed; ++attempt) {
    sharded_killed = kill_mid_write(dir, 1 << 20, [&] {
      ms::save_model_state(dir, *ms::identity_mapper_from_module(*big), *big, d9d_test::quiet_save(16 << 20));
    });
  }
  if (sharded_killed) {
    ++count;
    EXPECT_EQ(snapshot(dir).size(), before.size() + partial_files(dir).size());
    for (const auto& [name, bytes] : before) EXPECT_EQ(read_bytes(dir + "/" + name), bytes) << name;
    ms::open_checkpoint(dir);  // still the old checkpoint, whole
    ms::write_file_atomically(dir + "/notes.txt", "x");
    EXPECT_TRUE(partial_files(dir).empty());
  } else {
    ADD_FAILURE() << "the sharded save finished before it could be killed";
  }
  std::cout << "adversarial: killed writer: " << count << " cases\n";
}

// ------------------------------------------------------------- (6) full disk

TEST(Adversarial, FullDiskFailsNamingTheFileAndKeepsTheOldOne) {
  TempDir tmp;
  const std::string disk = tmp / "disk";
  fs::create_directories(disk);
  std::string reason;
  if (::geteuid() != 0) {
    reason = "not running as root, so no tmpfs can be mounted";
  } else if (::mount("tmpfs", disk.c_str(), "tmpfs", 0, "size=1m") != 0) {
    reason = std::string("mounting a 1 MiB tmpfs failed: ") + std::strerror(errno);
  }
  if (!reason.empty()) {
    std::cout << "adversarial: full disk: skipped: " << reason << "\n";
    GTEST_SKIP() << reason;
  }
  struct Unmount {
    std::string dir;
    ~Unmount() { ::umount2(dir.c_str(), MNT_DETACH); }
  } unmount{disk};
  size_t count = 0;

  const std::string path = disk + "/model.safetensors";
  ms::StateDict small;
  small.emplace("w", at::arange(1000, at::kFloat));
  ms::save_safetensors(path, small);
  const std::string old = read_bytes(path);
  // Fill the disk to within a page.
  {
    struct statvfs st {};
    ASSERT_EQ(::statvfs(disk.c_str(), &st), 0);
    const uint64_t free = static_cast<uint64_t>(st.f_bavail) * st.f_bsize;
    write_bytes(disk + "/filler", std::string(free > 4096 ? free - 4096 : 0, 'f'));
  }
  auto only_old_files = [&](const std::string& label) {
    std::set<std::string> names;
    for (const auto& entry : fs::directory_iterator(disk)) names.insert(entry.path().filename().string());
    EXPECT_EQ(names, (std::set<std::string>{"model.safetensors", "filler"})) << label;
    EXPECT_EQ(read_bytes(path), old) << label;
  };

  ++count;
  ms::StateDict large;
  large.emplace("w", at::ones({1 << 18}));  // 1 MiB
  EXPECT_THAT(d9d_error("save_safetensors", [&] { ms::save_safetensors(path, large); }),
              HasSubstr(path + ": write failed: No space left on device"));
  only_old_files("save_safetensors");

  ++count;
  const std::string notes = disk + "/notes.txt";
  EXPECT_THAT(d9d_error("write_file_atomically", [&] { ms::write_file_atomically(notes, std::string(1 << 16, 'x')); }),
              HasSubstr(notes + ": write failed: No space left on device"));
  only_old_files("write_file_atomically");

  ++count;
  toy::Toy model;
  EXPECT_THAT(d9d_error("save_model_state", [&] {
                ms::save_model_state(disk, *ms::identity_mapper_from_module(*model), *model, d9d_test::quiet_save());
              }),
              HasSubstr(disk + "/model.safetensors: write failed: No space left on device"));
  only_old_files("save_model_state");

  ++count;
  const std::string merged = disk + "/merged";
  EXPECT_THAT(d9d_error("merge", [&] {
                hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", kToy + "/adapters/lora_attn_r4", merged,
                                                  1.0, ms::no_progress());
              }),
              HasSubstr(merged + "/model.safetensors: write failed: No space left on device"));
  only_old_files("merge");
  std::cout << "adversarial: full disk: " << count << " cases\n";
}

}  // namespace
