#pragma once
// Helpers shared by the test files: fixture paths, temporary directories, quiet loads.

#include <d9d/model_state/io/stream.h>
#include <d9d/model_state/load.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace d9d_test {

namespace fs = std::filesystem;

inline const std::string kToy = std::string(D9D_FIXTURES_DIR) + "/hf_peft/toy";
inline const std::vector<std::string> kAdapters = {"lora_attn_r4", "lora_all_linear_r8", "lora_rslora",
                                                   "lora_embed_head", "dora_mlp"};

/// A fresh directory named after the running test, removed when it ends.
struct TempDir {
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string(info->test_suite_name()) + "-" + info->name();
    for (char& c : name) {
      if (c == '/') c = '_';
    }
    path = fs::temp_directory_path() / ("d9d-test-" + std::to_string(::getpid()) + "-" + name);
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& child) const { return (path / child).string(); }
  std::string str() const { return path.string(); }
  fs::path path;
};

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

/// Load options without the progress line.
inline d9d::model_state::LoadOptions quiet() {
  d9d::model_state::LoadOptions o;
  o.progress = nullptr;
  return o;
}

/// Save options without the progress line; `shard_size` 0: one file.
inline d9d::model_state::SaveOptions quiet_save(uint64_t shard_size = 0) {
  d9d::model_state::SaveOptions o;
  o.shard_size = shard_size;
  o.progress = nullptr;
  return o;
}

}  // namespace d9d_test
