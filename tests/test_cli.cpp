// Merging a Hugging Face PEFT adapter into a checkpoint on disk (what `d9d-peft merge` does):
// PEFT's merged weights for every fixture adapter, from every base layout, and the errors.
// Then the example trainer, d9d-peft-train, run on full_tune configs: what it writes to full_tune/.
#include "test_util.h"

#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/io/source.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/hf/merge.h>

#include <ATen/Functions.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
namespace hf = d9d::peft::hf;
using ::testing::HasSubstr;
using namespace d9d_test;

namespace {

std::vector<std::string> files_in(const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  if (!fs::exists(dir, ec)) return names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::string fmt_shard(int i) { return "model-0000" + std::to_string(i + 1) + "-of-00002.safetensors"; }

/// Writes the toy base as two shards and an index; returns the index.
ms::SafetensorsIndex write_sharded_toy(const std::string& dir) {
  const auto base = ms::SafetensorsFile::open(kToy + "/model.safetensors");
  ms::StateDict halves[2];
  ms::SafetensorsIndex index;
  size_t i = 0;
  const ms::KeySet keys = base->keys();
  for (const auto& key : keys) {
    const int half = i++ < keys.size() / 2 ? 0 : 1;
    halves[half].emplace(key, base->get(key));
    index.weight_map.emplace(key, fmt_shard(half));
  }
  fs::create_directories(dir);
  ms::save_safetensors(dir + "/" + fmt_shard(0), halves[0], {{"format", "pt"}});
  ms::save_safetensors(dir + "/" + fmt_shard(1), halves[1], {{"format", "pt"}});
  ms::write_file_atomically(dir + "/model.safetensors.index.json", ms::dump_safetensors_index(index));
  return index;
}

/// The largest difference between the merged checkpoint in `out` and PEFT's
/// merged weights; every other tensor must equal the base's bit for bit.
double check_merged(const std::string& out, const std::string& adapter) {
  const auto expected = ms::SafetensorsFile::open(kToy + "/adapters/" + adapter + "/expected.safetensors");
  const auto base = ms::SafetensorsFile::open(kToy + "/model.safetensors");
  const ms::SourcePtr merged = ms::open_checkpoint(out);
  EXPECT_EQ(merged->keys(), base->keys());
  std::set<std::string> merged_keys;
  double worst = 0;
  for (const auto& key : expected->keys()) {
    if (key.rfind("merged.", 0) != 0 || key == "merged_logits") continue;
    const std::string k = key.substr(7);
    merged_keys.insert(k);
    const at::Tensor got = merged->read(k);
    EXPECT_EQ(got.scalar_type(), base->get(k).scalar_type()) << k;
    const double diff = (got - expected->get(key)).abs().max().item<double>();
    EXPECT_LE(diff, 1e-5) << adapter << ": " << k;
    worst = std::max(worst, diff);
  }
  EXPECT_FALSE(merged_keys.empty());
  for (const auto& key : base->keys()) {
    if (merged_keys.count(key)) continue;
    const at::Tensor got = merged->read(key);
    const at::Tensor want = base->get(key);
    EXPECT_EQ(got.scalar_type(), want.scalar_type()) << key;
    EXPECT_TRUE(at::equal(got, want)) << adapter << ": untouched tensor changed: " << key;
  }
  return worst;
}

std::string merge_error(const std::string& base, const std::string& adapter, const std::string& out,
                        double scale = 1.0) {
  try {
    hf::merge_adapter_into_checkpoint(base, adapter, out, scale, ms::no_progress());
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<no error>";
}

/// A copy of a fixture adapter whose config is patched with `patch_json`.
std::string patched_adapter(const TempDir& tmp, const std::string& adapter, const std::string& patch_json) {
  static int count = 0;
  const std::string dir = tmp / ("adapter-" + adapter + "-" + std::to_string(++count));
  fs::create_directories(dir);
  fs::copy_file(kToy + "/adapters/" + adapter + "/adapter_model.safetensors", dir + "/adapter_model.safetensors");
  std::ifstream in(kToy + "/adapters/" + adapter + "/adapter_config.json");
  auto j = nlohmann::json::parse(in);
  j.merge_patch(nlohmann::json::parse(patch_json));
  std::ofstream(dir + "/adapter_config.json") << j.dump(2);
  return dir;
}

}  // namespace

class CliMergeFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(CliMergeFixture, SafetensorsBaseGivesPeftMergedWeights) {
  TempDir tmp;
  const std::string out = tmp / "out";
  hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", kToy + "/adapters/" + GetParam(), out, 1.0,
                                    ms::no_progress());
  EXPECT_EQ(files_in(out), std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ(ms::SafetensorsFile::open(out + "/model.safetensors")->header().metadata.at("format"), "pt");
  const double diff = check_merged(out, GetParam());
  std::printf("[ merge    ] %-20s max |merged - PEFT| = %.3g\n", GetParam().c_str(), diff);
  RecordProperty("max_abs_diff", std::to_string(diff));
}

TEST_P(CliMergeFixture, TorchSaveBaseGivesPeftMergedWeights) {
  TempDir tmp;
  const std::string out = tmp / "out";
  hf::merge_adapter_into_checkpoint(kToy + "/model.pt", kToy + "/adapters/" + GetParam(), out, 1.0,
                                    ms::no_progress());
  EXPECT_EQ(files_in(out), std::vector<std::string>{"model.safetensors"});
  check_merged(out, GetParam());
}

TEST_P(CliMergeFixture, ShardedBaseKeepsItsLayout) {
  TempDir tmp;
  const ms::SafetensorsIndex index = write_sharded_toy(tmp / "base");
  const std::string out = tmp / "out";
  hf::merge_adapter_into_checkpoint(tmp / "base", kToy + "/adapters/" + GetParam(), out, 1.0, ms::no_progress());
  EXPECT_EQ(files_in(out), (std::vector<std::string>{fmt_shard(0), fmt_shard(1), "model.safetensors.index.json"}));
  const ms::SafetensorsIndex written =
      ms::parse_safetensors_index(read_bytes(out + "/model.safetensors.index.json"), "index");
  EXPECT_EQ(written.weight_map, index.weight_map);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(ms::SafetensorsFile::open(out + "/" + fmt_shard(i))->keys(),
              ms::SafetensorsFile::open(tmp / "base/" + fmt_shard(i))->keys());
  }
  check_merged(out, GetParam());

  // The index itself names the base just as well.
  const std::string out2 = tmp / "out2";
  hf::merge_adapter_into_checkpoint(tmp / "base/model.safetensors.index.json", kToy + "/adapters/" + GetParam(), out2,
                                    1.0, ms::no_progress());
  check_merged(out2, GetParam());
}

INSTANTIATE_TEST_SUITE_P(Adapters, CliMergeFixture, ::testing::ValuesIn(kAdapters),
                         [](const auto& info) { return info.param; });

TEST(CliMerge, ScaleMultipliesTheDelta) {
  TempDir tmp;
  hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", kToy + "/adapters/lora_attn_r4", tmp / "half", 0.5,
                                    ms::no_progress());
  const auto base = ms::SafetensorsFile::open(kToy + "/model.safetensors");
  const auto expected = ms::SafetensorsFile::open(kToy + "/adapters/lora_attn_r4/expected.safetensors");
  const auto half = ms::SafetensorsFile::open(tmp / "half/model.safetensors");
  for (const std::string key : {"layers.0.attention.q_proj.weight", "layers.0.attention.v_proj.weight"}) {
    const at::Tensor want = base->get(key) + 0.5 * (expected->get("merged." + key) - base->get(key));
    EXPECT_LE((half->get(key) - want).abs().max().item<double>(), 1e-5) << key;
  }
}

TEST(CliMerge, MergeLoraWeightWorksOnOneTensor) {
  const hf::AdapterFiles adapter = hf::read_adapter_files(kToy + "/adapters/lora_embed_head");
  const hf::LoraConfig config = hf::parse_lora_config(adapter.config, adapter.config_path);
  EXPECT_EQ(hf::adapted_module_paths(adapter.tensors), (std::vector<std::string>{"embed_tokens", "lm_head"}));
  const auto base = ms::SafetensorsFile::open(kToy + "/model.safetensors");
  const auto expected = ms::SafetensorsFile::open(kToy + "/adapters/lora_embed_head/expected.safetensors");
  for (const std::string path : {"embed_tokens", "lm_head"}) {
    // bfloat16 in, bfloat16 out: computed in float32, cast back.
    const at::Tensor merged =
        hf::merge_lora_weight(base->get(path + ".weight").to(at::kBFloat16), path, adapter.tensors, config);
    EXPECT_EQ(merged.scalar_type(), at::kBFloat16);
    const at::Tensor want = expected->get("merged." + path + ".weight");
    const double tolerance = 2.0 / 256 * want.abs().max().item<double>();  // two bfloat16 roundings
    EXPECT_LE((merged.to(at::kFloat) - want).abs().max().item<double>(), tolerance);
    const at::Tensor exact = hf::merge_lora_weight(base->get(path + ".weight"), path, adapter.tensors, config);
    EXPECT_LE((exact - expected->get("merged." + path + ".weight")).abs().max().item<double>(), 1e-5);
  }
}

TEST(CliMerge, WrongBaseNamesTheKey) {
  TempDir tmp;
  const std::string msg = merge_error(std::string(D9D_FIXTURES_DIR) + "/hf_peft/conv/model.safetensors",
                                      kToy + "/adapters/lora_attn_r4", tmp / "out");
  EXPECT_THAT(msg, HasSubstr("the adapter changes 'layers.0.attention.q_proj.weight', which the base checkpoint "
                             "does not hold (wrong base model?)"));
  EXPECT_FALSE(fs::exists(tmp / "out"));
}

TEST(CliMerge, ShapeMismatchNamesKeyAndShapes) {
  TempDir tmp;
  auto state = ms::SafetensorsFile::open(kToy + "/model.safetensors")->load_all();
  state["layers.0.mlp.up_proj.weight"] = at::zeros({32, 16});
  ms::save_safetensors(tmp / "base.safetensors", state);
  const std::string msg = merge_error(tmp / "base.safetensors", kToy + "/adapters/dora_mlp", tmp / "out");
  EXPECT_THAT(msg, HasSubstr("'layers.0.mlp.up_proj.weight' has shape [32, 16] in the base checkpoint"));
  EXPECT_THAT(msg, HasSubstr("need [40, 16] (wrong base model?)"));
  EXPECT_FALSE(fs::exists(tmp / "out"));
}

TEST(CliMerge, RankMustAgreeWithTheConfig) {
  TempDir tmp;
  const std::string adapter = patched_adapter(tmp, "lora_attn_r4", R"({"r": 2})");
  EXPECT_THAT(merge_error(kToy + "/model.safetensors", adapter, tmp / "out"),
              HasSubstr("'base_model.model.layers.0.attention.q_proj.lora_A.weight' has rank 4 (shape [4, 16]) but "
                        "adapter_config.json gives r = 2 for 'layers.0.attention.q_proj'"));
  const std::string patterned = patched_adapter(tmp, "lora_rslora", R"({"rank_pattern": {"v_proj": 4}})");
  EXPECT_THAT(merge_error(kToy + "/model.safetensors", patterned, tmp / "out"),
              HasSubstr("gives r = 4 for 'layers.0.attention.v_proj'"));
}

TEST(CliMerge, ConfigAndWeightsMustAgree) {
  TempDir tmp;
  EXPECT_THAT(merge_error(kToy + "/model.safetensors", patched_adapter(tmp, "lora_attn_r4", R"({"target_modules":
              ["q_proj"]})"), tmp / "out"),
              HasSubstr("adapter_config.json does not target 'layers.0.attention.v_proj'"));
  EXPECT_THAT(merge_error(kToy + "/model.safetensors", patched_adapter(tmp, "dora_mlp", R"({"use_dora": false})"),
                          tmp / "out"),
              HasSubstr("lora_magnitude_vector' but adapter_config.json does not set use_dora"));
  EXPECT_THAT(merge_error(kToy + "/model.safetensors", patched_adapter(tmp, "lora_attn_r4", R"({"fan_in_fan_out":
              true})"), tmp / "out"),
              HasSubstr("fan_in_fan_out: true is not supported"));
  EXPECT_THAT(merge_error(kToy + "/model.safetensors", tmp.path.string(), tmp / "out"),
              HasSubstr("no adapter_config.json"));
  EXPECT_FALSE(fs::exists(tmp / "out"));

  // A key the merge does not know is an error, not silently dropped.
  const std::string extra = patched_adapter(tmp, "lora_attn_r4", "{}");
  auto weights = ms::SafetensorsFile::open(extra + "/adapter_model.safetensors")->load_all();
  weights["base_model.model.layers.0.attention.q_proj.lora_B.bias"] = at::zeros({16});
  ms::save_safetensors(extra + "/adapter_model.safetensors", weights);
  EXPECT_THAT(merge_error(kToy + "/model.safetensors", extra, tmp / "out"),
              HasSubstr("'base_model.model.layers.0.attention.q_proj.lora_B.bias' is not a LoRA weight d9d-peft can "
                        "merge"));
}

TEST(CliMerge, RefusesToWriteOverTheBase) {
  TempDir tmp;
  fs::create_directories(tmp / "base");
  fs::copy_file(kToy + "/model.safetensors", tmp / "base/model.safetensors");
  const std::string before = read_bytes(tmp / "base/model.safetensors");
  const std::string adapter = kToy + "/adapters/lora_attn_r4";
  EXPECT_THAT(merge_error(tmp / "base", adapter, tmp / "base"), HasSubstr("is where the base checkpoint lies"));
  EXPECT_THAT(merge_error(tmp / "base/model.safetensors", adapter, tmp / "base"),
              HasSubstr("merging would overwrite the base; choose another --out directory"));
  EXPECT_THAT(merge_error(tmp / "base/model.safetensors", adapter, tmp / "base/."),
              HasSubstr("is where the base checkpoint lies"));
  EXPECT_EQ(read_bytes(tmp / "base/model.safetensors"), before);
  EXPECT_EQ(files_in(tmp / "base"), std::vector<std::string>{"model.safetensors"});

  // Nor next to another checkpoint that readers would confuse with the merged one.
  write_sharded_toy(tmp / "other");
  EXPECT_THAT(merge_error(kToy + "/model.safetensors", adapter, tmp / "other"),
              HasSubstr("already holds 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', "
                        "'model.safetensors.index.json', which this merge would not replace"));
}

TEST(CliMerge, ShardNameWithANulIsRefusedAndLeavesAnExistingOutAsItWas) {
  // "model-00001-of-00002.safetensors\0x" reads as the real shard (the OS
  // stops at the NUL), so half a shard was written to the same output path
  // as the other half, after an existing merged checkpoint was replaced.
  TempDir tmp;
  const ms::SafetensorsIndex valid = write_sharded_toy(tmp / "base");
  const std::string adapter = kToy + "/adapters/lora_attn_r4";
  hf::merge_adapter_into_checkpoint(tmp / "base", adapter, tmp / "out", 1.0, ms::no_progress());
  std::map<std::string, std::string> before;
  for (const auto& name : files_in(tmp / "out")) before[name] = read_bytes(tmp / "out/" + name);

  nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", valid.weight_map}};
  const std::string alias = fmt_shard(0) + std::string(1, '\0') + "x";
  std::string aliased_key;
  for (auto& item : index["weight_map"].items()) {
    if (item.value() == fmt_shard(0) && !aliased_key.empty()) continue;
    if (item.value() == fmt_shard(0)) {
      aliased_key = item.key();
      item.value() = alias;
    }
  }
  std::ofstream(tmp / "base/model.safetensors.index.json", std::ios::trunc) << index.dump(2);
  for (const std::string out : {tmp / "out", tmp / "fresh"}) {
    try {
      hf::merge_adapter_into_checkpoint(tmp / "base", adapter, out, 1.0, ms::no_progress());
      ADD_FAILURE() << "no error";
    } catch (const ms::CheckpointError& e) {
      EXPECT_THAT(e.what(), HasSubstr(tmp / "base/model.safetensors.index.json: weight_map['" + aliased_key +
                                      "'] = \"" + fmt_shard(0) + "\\u0000x\" is not a plain file name: it contains a "
                                      "NUL character"));
    }
  }
  std::map<std::string, std::string> after;
  for (const auto& name : files_in(tmp / "out")) after[name] = read_bytes(tmp / "out/" + name);
  EXPECT_EQ(after, before) << "the existing merged checkpoint changed";
  EXPECT_FALSE(fs::exists(tmp / "fresh"));
}

TEST(CliMerge, FailedMergeLeavesNoFiles) {
  TempDir tmp;
  write_sharded_toy(tmp / "base");
  const size_t first_shard = ms::SafetensorsFile::open(tmp / "base/" + fmt_shard(0))->keys().size();
  // Fail after the first shard was written: nothing may be left behind.
  auto failing = [&](const ms::ProgressInfo& p) {
    if (p.done == first_shard + 1) throw ms::CheckpointError("disk full (simulated)");
  };
  fs::create_directories(tmp / "existing");
  std::ofstream(tmp / "existing/config.json") << "{}";
  for (const std::string out : {tmp / "fresh", tmp / "existing"}) {
    try {
      hf::merge_adapter_into_checkpoint(tmp / "base", kToy + "/adapters/lora_all_linear_r8", out, 1.0, failing);
      ADD_FAILURE() << "no error";
    } catch (const ms::CheckpointError& e) {
      EXPECT_THAT(e.what(), HasSubstr("disk full"));
    }
  }
  EXPECT_FALSE(fs::exists(tmp / "fresh"));
  EXPECT_EQ(files_in(tmp / "existing"), std::vector<std::string>{"config.json"});

  // A later merge into the same place succeeds and keeps other files.
  hf::merge_adapter_into_checkpoint(tmp / "base", kToy + "/adapters/lora_all_linear_r8", tmp / "existing", 1.0,
                                    ms::no_progress());
  EXPECT_EQ(files_in(tmp / "existing"),
            (std::vector<std::string>{"config.json", fmt_shard(0), fmt_shard(1), "model.safetensors.index.json"}));
}

TEST(CliMerge, ABaseTruncatedDuringTheMergeIsAnErrorAndLeavesNothingBehind) {
  // Another process truncates the base while the merge reads it: through a
  // memory mapping this was SIGBUS (exit 135, no message, an empty OUT left).
  TempDir tmp;
  write_sharded_toy(tmp / "base");
  const std::string second = tmp / "base/" + fmt_shard(1);
  const size_t first_shard = ms::SafetensorsFile::open(tmp / "base/" + fmt_shard(0))->keys().size();
  auto truncating = [&](const ms::ProgressInfo& p) {
    if (p.done == first_shard + 1) fs::resize_file(second, fs::file_size(second) / 2);
  };
  try {
    hf::merge_adapter_into_checkpoint(tmp / "base", kToy + "/adapters/lora_all_linear_r8", tmp / "out", 1.0,
                                      truncating);
    ADD_FAILURE() << "no error";
  } catch (const ms::CheckpointError& e) {
    EXPECT_THAT(e.what(), HasSubstr(second + ": the file was truncated or replaced while it was read"));
  }
  EXPECT_FALSE(fs::exists(tmp / "out")) << "nothing left behind";
}

TEST(CliMerge, ReportsProgressPerTensor) {
  TempDir tmp;
  std::vector<ms::ProgressInfo> seen;
  hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", kToy + "/adapters/lora_attn_r4", tmp / "out", 1.0,
                                    [&](const ms::ProgressInfo& p) { seen.push_back(p); });
  ASSERT_EQ(seen.size(), 25u);  // 24 tensors + the final report
  EXPECT_EQ(seen.front().stage, "merge");
  EXPECT_EQ(seen.front().done, 1u);
  EXPECT_EQ(seen.back().done, 24u);
  EXPECT_TRUE(seen.back().finished);
  EXPECT_EQ(seen.back().bytes_done, seen.back().bytes_total);
}

TEST(CliMerge, NonFiniteAdapterIsRefusedBeforeAnythingIsWritten) {
  // PEFT's safe_merge: a NaN in the adapter must not reach the merged checkpoint.
  TempDir tmp;
  const std::string adapter = tmp / "nan-adapter";
  fs::create_directories(adapter);
  fs::copy_file(kToy + "/adapters/lora_attn_r4/adapter_config.json", adapter + "/adapter_config.json");
  auto tensors = ms::SafetensorsFile::open(kToy + "/adapters/lora_attn_r4/adapter_model.safetensors")->load_all();
  const std::string bad_key = "base_model.model.layers.1.attention.v_proj.lora_B.weight";
  ASSERT_TRUE(tensors.count(bad_key));
  tensors[bad_key] = tensors[bad_key].clone();  // the mapped file is read-only
  tensors[bad_key].view(-1)[3] = std::numeric_limits<float>::quiet_NaN();
  ms::save_safetensors(adapter + "/adapter_model.safetensors", tensors);

  fs::create_directories(tmp / "existing");
  std::ofstream(tmp / "existing/config.json") << "{}";
  for (const std::string out : {tmp / "fresh", tmp / "existing"}) {
    try {
      hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", adapter, out, 1.0, ms::no_progress());
      ADD_FAILURE() << "no error";
    } catch (const d9d::peft::PeftError& e) {
      EXPECT_THAT(e.what(), HasSubstr("'" + bad_key + "' holds 1 NaN or Inf value (of 64)"));
      EXPECT_THAT(e.what(), HasSubstr("layers.1.attention.v_proj.weight"));
      EXPECT_THAT(e.what(), HasSubstr("--allow-non-finite"));
    }
  }
  EXPECT_FALSE(fs::exists(tmp / "fresh"));
  EXPECT_EQ(files_in(tmp / "existing"), std::vector<std::string>{"config.json"});

  // Asked for, the NaN is merged (into that row of the weight only).
  hf::MergeOptions options;
  options.allow_non_finite = true;
  options.progress = ms::no_progress();
  hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", adapter, tmp / "anyway", options);
  const at::Tensor merged = ms::SafetensorsFile::open(tmp / "anyway/model.safetensors")->get("layers.1.attention.v_proj.weight");
  EXPECT_GT(at::isnan(merged).sum().item<int64_t>(), 0);
  EXPECT_LT(at::isnan(merged).sum().item<int64_t>(), merged.numel());
}

TEST(CliMerge, OverflowingMergeIsRefusedAndNamesTheWeight) {
  // Finite adapter, finite base, but the sum leaves float32's range.
  TempDir tmp;
  auto base = ms::SafetensorsFile::open(kToy + "/model.safetensors")->load_all();
  const std::string key = "layers.0.attention.q_proj.weight";
  base[key] = at::full_like(base[key], std::numeric_limits<float>::max());
  ms::save_safetensors(tmp / "huge.safetensors", base);
  try {
    hf::merge_adapter_into_checkpoint(tmp / "huge.safetensors", kToy + "/adapters/lora_attn_r4", tmp / "out", 1e38,
                                      ms::no_progress());
    ADD_FAILURE() << "no error";
  } catch (const d9d::peft::PeftError& e) {
    EXPECT_THAT(e.what(), HasSubstr("merging into '" + key + "' gives"));
    EXPECT_THAT(e.what(), HasSubstr("the sum overflows Float"));
  }
  EXPECT_FALSE(fs::exists(tmp / "out"));
  const hf::AdapterFiles files = hf::read_adapter_files(kToy + "/adapters/lora_attn_r4");
  const hf::LoraConfig config = hf::parse_lora_config(files.config, files.config_path);
  EXPECT_THROW(hf::merge_lora_weight(base[key], "layers.0.attention.q_proj", files.tensors, config, 1e38),
               d9d::peft::PeftError);
  EXPECT_TRUE(at::isinf(hf::merge_lora_weight(base[key], "layers.0.attention.q_proj", files.tensors, config,
                                              1e38, /*allow_non_finite=*/true))
                  .any()
                  .item<bool>());
  // A scale float32 cannot hold is refused by name, not by a LibTorch conversion error.
  try {
    hf::merge_adapter_into_checkpoint(kToy + "/model.safetensors", kToy + "/adapters/lora_attn_r4", tmp / "out", 1e40,
                                      ms::no_progress());
    ADD_FAILURE() << "no error";
  } catch (const d9d::peft::PeftError& e) {
    EXPECT_THAT(e.what(), HasSubstr("does not fit float32"));
  }
}

// ------------------------------------------------------------ d9d-peft-train
// Compiled only with the trainer (D9D_PEFT_BUILD_EXAMPLES, on in CI): never skipped at run time.
#ifdef D9D_TRAINER

namespace {

struct TrainerRun {
  int exit_code = -1;
  std::string log;  // stdout and stderr
  fs::path out;
};

/// Runs d9d-peft-train with `peft` (a JSON PEFT config) on a tiny model for a few
/// steps, writing into `dir`.
TrainerRun run_trainer(const TempDir& dir, const std::string& peft) {
  const std::string config = dir / "run.json";
  std::ofstream(config) << R"({"name": "full_tune_test", "seed": 3,
    "task": {"symbols": 8, "length": 4, "eval_sequences": 64},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64},
    "pretrain": {"steps": 40, "batch_size": 16, "lr": 5e-3, "warmup_steps": 5},
    "finetune": {"steps": 20, "batch_size": 16, "lr": 5e-3, "warmup_steps": 2},
    "log_every": 10, "peft": )" << peft << "}\n";
  TrainerRun run;
  run.out = dir.path / "run";
  const std::string command = std::string("'") + D9D_TRAINER + "' --config '" + config + "' --out '" +
                              run.out.string() + "' > '" + (dir / "log.txt") + "' 2>&1";
  const int status = std::system(command.c_str());
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  run.log = read_bytes(dir / "log.txt");
  return run;
}

/// The base checkpoint's keys of the parameters of modules whose name fully matches `pattern`.
std::set<std::string> base_keys_of_modules(const ms::SafetensorsFile& base, const std::string& pattern) {
  const std::regex re(pattern);
  std::set<std::string> keys;
  for (const auto& key : base.keys()) {
    if (std::regex_match(key.substr(0, key.rfind('.')), re)) keys.insert(key);
  }
  return keys;
}

bool same_values(const at::Tensor& a, const at::Tensor& b) { return a.sizes() == b.sizes() && at::equal(a, b); }

}  // namespace

TEST(TrainerFullTune, FullTuneOnlyRunSavesTheTunedWeightsUnderTheBaseKeys) {
  TempDir tmp;
  const TrainerRun run = run_trainer(tmp, R"({"kind": "full_tune", "module_name_pattern": ".*norm"})");
  ASSERT_EQ(run.exit_code, 0) << run.log;
  EXPECT_THAT(run.log, HasSubstr("result: OK"));
  EXPECT_THAT(run.log, HasSubstr("(none: no LoRA layer, so no Hugging Face adapter)"));
  EXPECT_THAT(run.log, ::testing::ContainsRegex("full_tune reload +max \\|diff\\| [^ ]+: ok"));
  EXPECT_FALSE(fs::exists(run.out / "adapter"));

  const fs::path file = run.out / "full_tune" / "model.safetensors";
  ASSERT_TRUE(fs::is_regular_file(file)) << run.log;
  const auto tuned = ms::SafetensorsFile::open(file.string());
  const auto base = ms::SafetensorsFile::open((run.out / "base" / "model.safetensors").string());
  const auto merged = ms::SafetensorsFile::open((run.out / "merged" / "model.safetensors").string());
  EXPECT_EQ(tuned->header().metadata, (std::map<std::string, std::string>{{"format", "pt"}}));

  // Exactly the parameters of the modules the pattern matches, under the base's names.
  const std::set<std::string> expected = base_keys_of_modules(*base, ".*norm");
  EXPECT_EQ(expected.size(), 10u);  // layers.{0,1}.{attn_norm,mlp_norm}.{weight,bias}, norm.{weight,bias}
  EXPECT_EQ(tuned->keys(), expected);

  for (const auto& key : tuned->keys()) {
    const at::Tensor value = tuned->get(key);
    ASSERT_TRUE(base->contains(key)) << key;
    EXPECT_EQ(value.scalar_type(), base->get(key).scalar_type()) << key;
    // Trained: not the base's values, and what the trained (merged) model holds.
    EXPECT_FALSE(same_values(value, base->get(key))) << key << " still holds the base's values";
    EXPECT_TRUE(same_values(value, merged->get(key))) << key << " differs from merged/";
  }
  // Nothing else was trained: every other tensor of merged/ is the base's.
  for (const auto& key : base->keys()) {
    if (!expected.count(key)) EXPECT_TRUE(same_values(merged->get(key), base->get(key))) << key;
  }
}

TEST(TrainerFullTune, StackWithLoraSavesBothAndFullTuneKeepsTheBaseKeys) {
  // full_tune of the norms and of one projection LoRA also wraps: that layer's
  // weights live at q_proj.base.* in the model but are saved as q_proj.*.
  TempDir tmp;
  const TrainerRun run = run_trainer(tmp, R"({"kind": "stack", "methods": [
    {"kind": "lora", "module_name_pattern": ".*attention\\..*_proj", "params": {"r": 2, "alpha": 4, "dropout": 0.0}},
    {"kind": "full_tune", "module_name_pattern": ".*norm|layers\\.0\\.attention\\.q_proj"}]})");
  ASSERT_EQ(run.exit_code, 0) << run.log;
  EXPECT_THAT(run.log, HasSubstr("result: OK"));
  // The adapter and the full_tune weights load back and reproduce the trained model.
  EXPECT_THAT(run.log, ::testing::ContainsRegex("adapter reload +max \\|diff\\| [^ ]+: ok"));
  EXPECT_TRUE(fs::is_regular_file(run.out / "adapter" / "adapter_model.safetensors"));

  const fs::path file = run.out / "full_tune" / "model.safetensors";
  ASSERT_TRUE(fs::is_regular_file(file)) << run.log;
  const auto tuned = ms::SafetensorsFile::open(file.string());
  const auto base = ms::SafetensorsFile::open((run.out / "base" / "model.safetensors").string());
  const auto merged = ms::SafetensorsFile::open((run.out / "merged" / "model.safetensors").string());
  std::set<std::string> expected = base_keys_of_modules(*base, ".*norm");
  expected.insert({"layers.0.attention.q_proj.weight", "layers.0.attention.q_proj.bias"});
  EXPECT_EQ(tuned->keys(), expected);  // no q_proj.base.*, no lora_*
  for (const auto& key : tuned->keys()) {
    EXPECT_FALSE(same_values(tuned->get(key), base->get(key))) << key << " still holds the base's values";
  }
  // The norms are not under LoRA: merged/ holds the same values. (q_proj's
  // merged weight adds the LoRA delta to the saved one.)
  for (const auto& key : base_keys_of_modules(*base, ".*norm")) {
    EXPECT_TRUE(same_values(tuned->get(key), merged->get(key))) << key << " differs from merged/";
  }
  EXPECT_FALSE(same_values(tuned->get("layers.0.attention.q_proj.weight"), merged->get("layers.0.attention.q_proj.weight")));
}

TEST(TrainerIA3, AnIA3RunTrainsSavesAPeftIA3AdapterAndReloadsIt) {
  TempDir tmp;
  const TrainerRun run = run_trainer(tmp, R"json({"kind": "ia3", "module_name_pattern": ".*(k_proj|v_proj|down_proj)",
    "params": {"feedforward_pattern": ".*down_proj"}})json");
  ASSERT_EQ(run.exit_code, 0) << run.log;
  EXPECT_THAT(run.log, HasSubstr("result: OK"));
  EXPECT_THAT(run.log, ::testing::ContainsRegex("adapter reload +max \\|diff\\| [^ ]+: ok"));
  const auto config = nlohmann::json::parse(read_bytes((run.out / "adapter" / "adapter_config.json").string()));
  EXPECT_EQ(config["peft_type"], "IA3");
  const auto weights = ms::SafetensorsFile::open((run.out / "adapter" / "adapter_model.safetensors").string());
  EXPECT_TRUE(weights->contains("base_model.model.layers.0.mlp.down_proj.ia3_l"));
  EXPECT_EQ(weights->get("base_model.model.layers.0.mlp.down_proj.ia3_l").size(0), 1) << "feed-forward: [1, in]";
  EXPECT_EQ(weights->get("base_model.model.layers.0.attention.k_proj.ia3_l").size(1), 1) << "output: [out, 1]";
  // Trained: the vectors moved away from their initial ones.
  EXPECT_FALSE(at::equal(weights->get("base_model.model.layers.0.attention.k_proj.ia3_l"),
                         at::ones_like(weights->get("base_model.model.layers.0.attention.k_proj.ia3_l"))));
}

#endif  // D9D_TRAINER
