// Checkpoint IO: safetensors (validated, memory-mapped), sharded checkpoints,
// torch.save dicts, streaming loads and atomic saves through mappers.
#include "test_util.h"
#include "toy_model.h"

#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/io/source.h>
#include <d9d/model_state/io/stream.h>
#include <d9d/peft.h>

#include <torch/serialize.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::HasSubstr;
using namespace d9d_test;

namespace {

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

/// A safetensors file made of a header text and a data section.
std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + data;
}

std::string open_error(const std::string& path) {
  try {
    ms::open_checkpoint(path);
  } catch (const ms::CheckpointError& e) {
    return e.what();
  }
  return "<no error>";
}

std::string header_error(const std::string& header, const std::string& data, const TempDir& dir) {
  const std::string path = dir / "bad.safetensors";
  write_bytes(path, safetensors_bytes(header, data));
  return open_error(path);
}

/// Every dtype the format and LibTorch share, as buffers and parameters.
struct AllDtypesImpl : torch::nn::Module {
  AllDtypesImpl() {
    register_parameter("f64", torch::randn({3, 5}, torch::kDouble));
    register_parameter("f32", torch::randn({7}));
    register_buffer("f16", torch::randn({4, 2}).to(torch::kHalf));
    register_buffer("bf16", torch::randn({9}).to(torch::kBFloat16));
    register_buffer("i64", torch::randint(-1000, 1000, {6}, torch::kLong));
    register_buffer("i32", torch::randint(-1000, 1000, {2, 3}, torch::kInt));
    register_buffer("i16", torch::randint(-1000, 1000, {5}, torch::kShort));
    register_buffer("i8", torch::randint(-100, 100, {11}, torch::kChar));
    register_buffer("u8", torch::randint(0, 255, {13}, torch::kByte));
    register_buffer("bool", torch::randint(0, 2, {3}, torch::kLong).to(torch::kBool));
    register_buffer("empty", torch::empty({0, 4}));
    register_buffer("scalar", torch::tensor(3.5));
  }
};
TORCH_MODULE(AllDtypes);

void expect_same_state(const torch::nn::Module& a, const torch::nn::Module& b) {
  const auto sa = ms::module_state_dict(a), sb = ms::module_state_dict(b);
  ASSERT_EQ(sa.size(), sb.size());
  for (const auto& [key, t] : sa) {
    ASSERT_EQ(t.scalar_type(), sb.at(key).scalar_type()) << key;
    EXPECT_TRUE(torch::equal(t, sb.at(key))) << key << " is not bit-exact";
  }
}

}  // namespace

// ------------------------------------------------------------- fixtures

TEST(CheckpointIO, FixtureLogitsThroughLoRAMapperFromSafetensorsAndTorchSave) {
  auto inputs = ms::SafetensorsFile::open(kToy + "/inputs.safetensors");
  const auto ids = inputs->get("input_ids");
  const auto expected = inputs->get("logits");
  for (const char* file : {"/model.safetensors", "/model.pt"}) {
    toy::Toy model;
    peft::LoRA lora({R"(layers\.\d+\.(attention|mlp)\.\w+_proj|lm_head)", peft::LoRAParameters().r(4).alpha(8)});
    auto mapper = peft::inject_peft_and_freeze(lora, model);
    auto report = ms::load_model_state(kToy + file, *mapper, *model, quiet());
    EXPECT_TRUE(report.ok()) << report.to_string();
    EXPECT_EQ(report.loaded_keys.size(), 24u);
    torch::NoGradGuard g;
    EXPECT_TRUE(torch::allclose(model->forward(ids), expected, 1e-5, 1e-5)) << file;
  }
}

TEST(CheckpointIO, WriterIsByteIdenticalToTheReferenceWriter) {
  TempDir dir;
  for (const char* name : {"/model.safetensors", "/adapters/lora_attn_r4/adapter_model.safetensors"}) {
    auto original = ms::SafetensorsFile::open(kToy + name);
    ms::save_safetensors(dir / "copy.safetensors", original->load_all(), original->header().metadata);
    EXPECT_EQ(read_bytes(dir / "copy.safetensors"), read_bytes(kToy + name)) << name;
  }
}

TEST(CheckpointIO, TensorsAreOwnedAndWritingThemNeverChangesTheFile) {
  TempDir dir;
  ms::save_safetensors(dir / "a.safetensors", {{"w", torch::arange(16, torch::kFloat)}});
  const std::string before = read_bytes(dir / "a.safetensors");
  {
    auto file = ms::SafetensorsFile::open(dir / "a.safetensors");
    auto w = file->get("w");
    auto again = file->get("w");
    EXPECT_NE(w.data_ptr(), again.data_ptr()) << "each read is a tensor of its own";
    w.fill_(-1.0f);
    EXPECT_TRUE(torch::equal(again, torch::arange(16, torch::kFloat)));
  }
  EXPECT_EQ(read_bytes(dir / "a.safetensors"), before) << "writing to a tensor read must never change the file";
}

TEST(CheckpointIO, AFileTruncatedWhileOpenIsAnErrorNamingTheFileNotACrash) {
  // Through an unguarded memory mapping, this kills the process with SIGBUS.
  TempDir dir;
  const std::string path = dir / "big.safetensors";
  ms::save_safetensors(path, {{"a", torch::randn({4096})}, {"b", torch::randn({4096})}});
  auto file = ms::SafetensorsFile::open(path);
  const uint64_t b_begin = file->header().data_offset + file->header().tensors.at("b").begin;
  const at::Tensor a_view = file->view("a");
  const at::Tensor a_before = file->get("a");
  fs::resize_file(path, b_begin + 100);  // another process rewrites the checkpoint
  const std::string expected = path + ": the file was truncated or replaced while it was read";
  EXPECT_THAT([&] { file->get("b"); }, ::testing::ThrowsMessage<ms::CheckpointError>(HasSubstr(expected)));
  // A view read past the new end holds zeros, and verify() says so.
  EXPECT_TRUE(torch::equal(file->view("b").slice(0, 1024), torch::zeros({4096 - 1024})));
  EXPECT_THAT([&] { file->verify(); }, ::testing::ThrowsMessage<ms::CheckpointError>(HasSubstr(expected)));
  EXPECT_THAT([&] { file->release("a"); }, ::testing::ThrowsMessage<ms::CheckpointError>(HasSubstr(expected)));
  EXPECT_TRUE(torch::equal(a_view, a_before)) << "pages read before the truncation are kept";

  // The loader reads views of the mapping and reports it as well.
  ms::save_safetensors(path, {{"a", torch::randn({4096})}, {"b", torch::randn({4096})}});
  struct TwoTensors : torch::nn::Module {
    TwoTensors() {
      register_parameter("a", torch::zeros({4096}));
      register_parameter("b", torch::zeros({4096}));
    }
  } model;
  ms::LoadOptions options;
  options.progress = [&](const ms::ProgressInfo& p) {
    if (p.done == 1 && !p.finished) fs::resize_file(path, 4096);
  };
  EXPECT_THAT([&] { ms::load_model_state(path, *ms::identity_mapper_from_module(model), model, options); },
              ::testing::ThrowsMessage<ms::CheckpointError>(HasSubstr(expected)));
}

TEST(CheckpointIO, LoadsIntoAModelOnTheStack) {
  // Not every model is held by a shared_ptr (no TORCH_MODULE holder).
  TempDir dir;
  AllDtypes saved;
  ms::save_model_state(dir.path.string(), *ms::identity_mapper_from_module(*saved), *saved, quiet_save(0));
  AllDtypesImpl on_stack;
  auto report = ms::load_model_state(dir.path.string(), *ms::identity_mapper_from_module(on_stack), on_stack, quiet());
  EXPECT_TRUE(report.ok()) << report.to_string();
  expect_same_state(*saved, on_stack);
}

// ---------------------------------------------------------- round trips

TEST(CheckpointIO, SingleFileRoundTripIsBitExactForEveryDtype) {
  TempDir dir;
  AllDtypes saved;
  ms::save_model_state(dir.path.string(), *ms::identity_mapper_from_module(*saved), *saved, quiet_save(0));
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  AllDtypes loaded;
  auto report = ms::load_model_state(dir.path.string(), *ms::identity_mapper_from_module(*loaded), *loaded, quiet());
  EXPECT_TRUE(report.ok()) << report.to_string();
  expect_same_state(*saved, *loaded);
  auto header = ms::SafetensorsFile::open(dir / "model.safetensors")->header();
  EXPECT_EQ(header.metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
  EXPECT_EQ(header.tensors.at("bf16").dtype_name, "BF16");
  EXPECT_EQ(header.tensors.at("bool").dtype_name, "BOOL");
}

TEST(CheckpointIO, ShardedRoundTripIsBitExactAndWritesTheIndex) {
  TempDir dir;
  AllDtypes saved;
  ms::save_model_state(dir.path.string(), *ms::identity_mapper_from_module(*saved), *saved, quiet_save(64));
  const auto index = ms::parse_safetensors_index(read_bytes(dir / "model.safetensors.index.json"), "index");
  EXPECT_EQ(index.weight_map.size(), 12u);
  std::set<std::string> shards;
  for (const auto& item : index.weight_map) shards.insert(item.second);
  EXPECT_GT(shards.size(), 2u);
  char first[64];
  std::snprintf(first, sizeof first, "model-00001-of-%05zu.safetensors", shards.size());
  EXPECT_EQ(*shards.begin(), first);
  uint64_t total = 0;
  for (const auto& s : shards) {
    auto file = ms::SafetensorsFile::open(dir / s);
    for (const auto& t : file->header().tensors) total += t.second.end - t.second.begin;
  }
  EXPECT_EQ(index.total_size, total);
  AllDtypes loaded;
  auto source = ms::open_checkpoint(dir.path.string());
  EXPECT_TRUE(ms::load_model_state(*source, *ms::identity_mapper_from_module(*loaded), *loaded, quiet()).ok());
  expect_same_state(*saved, *loaded);
  for (const auto& entry : fs::directory_iterator(dir.path)) {
    EXPECT_THAT(entry.path().filename().string(), ::testing::Not(HasSubstr(".tmp-"))) << "no temporary left";
  }
}

TEST(CheckpointIO, SavingThroughAMapperWritesItsOutputKeys) {
  TempDir dir;
  toy::Toy model;
  peft::LoRA lora({"lm_head", peft::LoRAParameters().r(2).alpha(2)});
  peft::inject_peft_and_freeze(lora, model);
  peft::merge_peft(lora, model);
  std::vector<ms::MapperPtr> prefix;
  for (const auto& key : ms::module_state_keys(*model)) prefix.push_back(std::make_shared<ms::Rename>(key, "model." + key));
  ms::save_model_state(dir.path.string(), ms::Parallel(prefix), *model, quiet_save(0));
  auto source = ms::open_checkpoint(dir / "model.safetensors");
  EXPECT_TRUE(source->contains("model.lm_head.weight"));
  EXPECT_EQ(source->keys().size(), 24u);
}

TEST(CheckpointIO, ResavingReplacesTheOldCheckpointAndRemovesItsStaleShards) {
  TempDir dir;
  AllDtypes first;
  ms::save_model_state(dir.path.string(), *ms::identity_mapper_from_module(*first), *first, quiet_save(32));
  ASSERT_TRUE(fs::exists(dir / "model.safetensors.index.json"));
  AllDtypes second;
  ms::save_model_state(dir.path.string(), *ms::identity_mapper_from_module(*second), *second, quiet_save(0));
  std::vector<std::string> files;
  for (const auto& entry : fs::directory_iterator(dir.path)) files.push_back(entry.path().filename().string());
  EXPECT_EQ(files, std::vector<std::string>{"model.safetensors"});
  AllDtypes loaded;
  ms::load_model_state(dir.path.string(), *ms::identity_mapper_from_module(*loaded), *loaded, quiet());
  expect_same_state(*second, *loaded);
}

TEST(CheckpointIO, AFailedSaveLeavesTheOldCheckpointIntact) {
  TempDir dir;
  AllDtypes model;
  ms::save_model_state(dir.path.string(), *ms::identity_mapper_from_module(*model), *model, quiet_save(0));
  const std::string before = read_bytes(dir / "model.safetensors");
  ms::Parallel partial({std::make_shared<ms::Identity>("f32")});
  EXPECT_THAT([&] { ms::save_model_state(dir.path.string(), partial, *model, quiet_save(0)); },
              ::testing::ThrowsMessage<ms::CheckpointError>(HasSubstr("no mapper group reads 11 module keys")));
  ms::Parallel unknown({std::make_shared<ms::Identity>("nope")});
  EXPECT_THAT([&] { ms::save_model_state(dir.path.string(), unknown, *model, quiet_save(0)); },
              ::testing::ThrowsMessage<ms::CheckpointError>(HasSubstr("reads 'nope', which the module does not have")));
  EXPECT_EQ(read_bytes(dir / "model.safetensors"), before);
}

// --------------------------------------------------------------- loading

TEST(CheckpointIO, StrictLoadOfTheWrongCheckpointWritesNothing) {
  toy::Toy model;
  peft::LoRA lora({".*q_proj", peft::LoRAParameters().r(2).alpha(2)});
  auto mapper = peft::inject_peft_and_freeze(lora, model);
  const auto before = model->lm_head->weight.clone();
  toy::ToyConfig bigger;
  bigger.d = 8;
  toy::Toy other(bigger);
  TempDir dir;
  ms::save_model_state(dir.path.string(), *ms::identity_mapper_from_module(*other), *other, quiet_save(0));
  try {
    ms::load_model_state(dir.path.string(), *mapper, *model, quiet());
    FAIL() << "expected StateLoadError";
  } catch (const ms::StateLoadError& e) {
    EXPECT_THAT(e.what(), HasSubstr("nothing was loaded"));
    EXPECT_THAT(e.what(), HasSubstr("lm_head.weight: model [37, 16] Float, source [37, 8] Float"));
    EXPECT_EQ(e.report().mismatched_keys.size(), 22u);  // all but the two up_proj biases ([f]) depend on d
  }
  EXPECT_TRUE(torch::equal(model->lm_head->weight, before));
}

TEST(CheckpointIO, ReadModelStateStreamsGroupByGroup) {
  auto source = ms::open_checkpoint(kToy + "/model.safetensors");
  ms::Parallel mapper({std::make_shared<ms::Rename>("lm_head.weight", "head"),
                       std::make_shared<ms::Identity>("norm.weight")});
  std::vector<std::vector<std::string>> seen;
  std::vector<ms::ProgressInfo> progress;
  ms::read_model_state(
      *source, mapper,
      [&](ms::StateDict group) {
        std::vector<std::string> keys;
        for (const auto& item : group) keys.push_back(item.first);
        seen.push_back(keys);
      },
      [&](const ms::ProgressInfo& p) { progress.push_back(p); });
  EXPECT_EQ(seen, (std::vector<std::vector<std::string>>{{"head"}, {"norm.weight"}}));
  ASSERT_EQ(progress.size(), 3u);
  EXPECT_TRUE(progress.back().finished);
  EXPECT_EQ(progress.back().bytes_done, 37u * 16u * 4u + 16u * 4u);
  ms::Parallel missing({std::make_shared<ms::Identity>("nope")});
  EXPECT_THAT([&] { ms::read_model_state(*source, missing, [](ms::StateDict) {}); },
              ::testing::ThrowsMessage<ms::CheckpointError>(HasSubstr("model.safetensors: no tensor 'nope'")));
}

// ----------------------------------------------------------- bad input

TEST(CheckpointIO, OverflowingShapeSaysSo) {
  TempDir dir;
  // 2^62 float32 elements are 2^64 bytes, which wrapped to 0 and read as
  // "needs 0 bytes but data_offsets [0,0] span 0".
  EXPECT_THAT(header_error(R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", "", dir),
              HasSubstr("bad.safetensors: tensor 'w': shape [4611686018427387904] of F32 is too large: "
                        "4611686018427387904 elements of 4 bytes (1.84e+19 bytes) overflow 64 bits"));
  EXPECT_THAT(header_error(R"({"w":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})", "", dir),
              HasSubstr("tensor 'w': shape [4294967296,4294967296,0] of U8 is too large: its element count "
                        "overflows 64 bits"));
  EXPECT_THAT(header_error(R"({"w":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,0]}})", "", dir),
              HasSubstr("tensor 'w': shape [9223372036854775808] has dimension 9223372036854775808, larger than "
                        "2^63-1"));
  // As the reference reader: a 0 after dimensions whose product fits is an empty tensor.
  EXPECT_EQ(header_error(R"({"w":{"dtype":"F32","shape":[4611686018427387904,0],"data_offsets":[0,0]}})", "", dir),
            "<no error>");
  EXPECT_EQ(ms::SafetensorsFile::open(dir / "bad.safetensors")->get("w").numel(), 0);
}

TEST(CheckpointIO, MalformedSafetensorsAreErrorsNamingFileAndKey) {
  TempDir dir;
  const std::string f32x2 = std::string(8, '\0');
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  EXPECT_EQ(header_error(ok, f32x2, dir), "<no error>");

  write_bytes(dir / "short.safetensors", "abc");
  EXPECT_THAT(open_error(dir / "short.safetensors"), HasSubstr("short.safetensors: truncated: 3 bytes"));
  std::string past = safetensors_bytes(ok, f32x2);
  past[0] = static_cast<char>(0xff);
  write_bytes(dir / "past.safetensors", past);
  EXPECT_THAT(open_error(dir / "past.safetensors"), HasSubstr("header length 255 runs past the end of the file"));
  write_bytes(dir / "cut.safetensors", safetensors_bytes(ok, f32x2).substr(0, 8 + ok.size() + 5));
  EXPECT_THAT(open_error(dir / "cut.safetensors"),
              HasSubstr("tensor 'a': data_offsets [0,8] run past the data section (5 bytes): truncated file?"));

  EXPECT_THAT(header_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", f32x2, dir),
              HasSubstr("bad.safetensors: the header is not valid JSON"));
  EXPECT_THAT(header_error(R"([1,2])", f32x2, dir), HasSubstr("the header is not a JSON object"));
  EXPECT_THAT(header_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                           f32x2, dir),
              HasSubstr("key 'a' appears twice in the header"));
  EXPECT_THAT(header_error(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", f32x2, dir),
              HasSubstr("tensor 'a': dtype \"Q4\" is not supported"));
  EXPECT_THAT(header_error(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", f32x2, dir),
              HasSubstr("tensor 'a' shape entry must be a non-negative integer, got -2"));
  EXPECT_THAT(header_error(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", f32x2, dir),
              HasSubstr("tensor 'a': shape [3] of F32 needs 12 bytes but data_offsets [0,8] span 8"));
  EXPECT_THAT(header_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", f32x2, dir),
              HasSubstr("tensor 'a': data_offsets [0,16] run past the data section (8 bytes)"));
  EXPECT_THAT(header_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                           R"("b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
                           f32x2, dir),
              HasSubstr("tensor 'b' (bytes 2..6) overlaps tensor 'a' (ends at 4)"));
  EXPECT_THAT(header_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", f32x2, dir),
              HasSubstr("tensor 'a' starts at byte 4 but the previous data ends at 0: gap"));
  EXPECT_THAT(header_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", f32x2, dir),
              HasSubstr("the tensors cover 4 bytes of a 8-byte data section"));
  EXPECT_THAT(header_error(R"({"__metadata__":{"format":1},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                           f32x2, dir),
              HasSubstr("__metadata__.format must be a string, got 1"));
  EXPECT_THAT(header_error(R"({"a":{"dtype":"F32","shape":[2]}})", f32x2, dir),
              HasSubstr("tensor 'a': missing field 'data_offsets'"));
  EXPECT_THAT(open_error(dir / "absent.safetensors"), HasSubstr("absent.safetensors: no such file or directory"));
  write_bytes(dir / "good.safetensors", safetensors_bytes(ok, f32x2));
  auto file = ms::SafetensorsFile::open(dir / "good.safetensors");
  EXPECT_THAT([&] { file->get("zzz"); },
              ::testing::ThrowsMessage<ms::CheckpointError>(HasSubstr("good.safetensors: no tensor 'zzz'")));
}

TEST(CheckpointIO, DeeplyNestedJsonIsAnErrorNotACrash) {
  // Quoting a 100000-deep value in a message would recurse 100000 frames.
  TempDir dir;
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  EXPECT_THAT(header_error(R"({"a":)" + deep + "}", "", dir), HasSubstr("tensor 'a': expected an object, got a deeply nested array"));
  EXPECT_THAT(header_error(R"({"__metadata__":{"k":)" + deep + "}}", "", dir),
              HasSubstr("__metadata__.k must be a string, got a deeply nested array"));
  EXPECT_THAT([&] { ms::parse_safetensors_index(R"({"weight_map":{"w":)" + deep + "}}", "index.json"); },
              ::testing::ThrowsMessage<ms::CheckpointError>(HasSubstr("weight_map['w'] must be a file name, got a deeply nested array")));
}

TEST(CheckpointIO, MalformedIndexesAreErrorsNamingFileAndKey) {
  TempDir dir;
  ms::save_safetensors(dir / "s1.safetensors", {{"a", torch::ones({2})}});
  auto index_error = [&](const std::string& text) {
    write_bytes(dir / "model.safetensors.index.json", text);
    return open_error(dir.path.string());
  };
  EXPECT_EQ(index_error(R"({"metadata":{"total_size":8},"weight_map":{"a":"s1.safetensors"}})"), "<no error>");
  EXPECT_THAT(index_error(R"({"weight_map":{"a":"s2.safetensors"}})"),
              HasSubstr("key 'a' is mapped to shard 's2.safetensors', which does not exist"));
  EXPECT_THAT(index_error(R"({"weight_map":{"b":"s1.safetensors"}})"),
              HasSubstr("key 'b' is mapped to shard 's1.safetensors', which has no such tensor"));
  EXPECT_THAT(index_error(R"({"weight_map":{"a":"../s1.safetensors"}})"),
              HasSubstr("weight_map['a'] = \"../s1.safetensors\" is not a plain file name"));
  EXPECT_THAT(index_error(R"({"weight_map":{"a":3}})"), HasSubstr("weight_map['a'] must be a file name, got 3"));
  EXPECT_THAT(index_error(R"({"metadata":{}})"), HasSubstr("missing field 'weight_map'"));
  EXPECT_THAT(index_error(R"({"weight_map":{}, "extra": 1})"), HasSubstr("unknown field 'extra'"));
  EXPECT_THAT(index_error("{"), HasSubstr("model.safetensors.index.json: not valid JSON"));
  fs::remove(dir / "model.safetensors.index.json");
  EXPECT_THAT(open_error(dir.path.string()), HasSubstr("directory holds neither model.safetensors nor"));
}

TEST(CheckpointIO, TorchSaveThatIsNotAFlatDictIsAnError) {
  TempDir dir;
  write_bytes(dir / "junk.pt", "PK not really a zip");
  EXPECT_THAT(open_error(dir / "junk.pt"), HasSubstr("junk.pt: not a readable torch.save archive"));
  const auto bytes = torch::pickle_save(c10::IValue(int64_t(3)));
  write_bytes(dir / "int.pt", std::string(bytes.begin(), bytes.end()));
  EXPECT_THAT(open_error(dir / "int.pt"), HasSubstr("int.pt: expected a dict of tensors, got Int"));
}

TEST(CheckpointIO, TheNextWriteRemovesPartialFilesOfKilledWriters) {
  // A writer killed mid-write leaves its temporary file; the next write to the
  // same directory removes those whose process is gone, and nothing else.
  TempDir tmp;
  const std::vector<std::string> stale = {
      "model.safetensors.tmp-99999999-0badf00d",            // every writer now
      "model-00001-of-00002.safetensors.partial-99999998",  // shards of older versions
      ".model.safetensors.d9d-partial-99999997",            // merges of older versions
  };
  const std::string own = "model.safetensors.partial-" + std::to_string(::getpid());  // a live writer: this process
  const std::vector<std::string> kept = {"notes.txt", "a.tmp-12-xyz", "b.partial-abc", "config.json", own};
  for (const auto& name : stale) std::ofstream(tmp / name) << "half a file";
  for (const auto& name : kept) std::ofstream(tmp / name) << "keep";

  ms::save_safetensors(tmp / "new.safetensors", {{"w", torch::ones({2})}});
  for (const auto& name : stale) EXPECT_FALSE(fs::exists(tmp / name)) << name;
  for (const auto& name : kept) EXPECT_TRUE(fs::exists(tmp / name)) << name;
  EXPECT_TRUE(fs::exists(tmp / "new.safetensors"));
  EXPECT_EQ(ms::remove_stale_partial_files(tmp.str()), 0u);
}

TEST(CheckpointIO, LoadingIntoAMetaModelIsAnErrorNotANoOp) {
  TempDir dir;
  AllDtypes saved;
  ms::save_model_state(dir.path.string(), *ms::identity_mapper_from_module(*saved), *saved, quiet_save(0));
  struct MetaModel : torch::nn::Module {
    MetaModel() { register_parameter("f32", torch::empty({7}, torch::TensorOptions().device(torch::kMeta))); }
  } meta;
  EXPECT_THAT([&] { ms::load_model_state(dir.path.string(), *ms::identity_mapper_from_module(meta), meta, quiet()); },
              ::testing::ThrowsMessage<ms::StateLoadError>(HasSubstr("the model's 'f32' is on the meta device (1 of 1 tensors are)")));
}

TEST(CheckpointIO, AFailedSaveRemovesTheDirectoryItCreated) {
  TempDir dir;
  AllDtypes model;
  const std::string out = dir / "new/checkpoint";
  fs::create_directories(dir / "new");
  // A failure after the first group was written (as a full disk would be).
  auto progress = [](const ms::ProgressInfo& p) {
    if (!p.finished) throw ms::CheckpointError("disk full (simulated)");
  };
  ms::SaveOptions options = quiet_save(0);
  options.progress = progress;
  EXPECT_THROW(ms::save_model_state(out, *ms::identity_mapper_from_module(*model), *model, options), ms::CheckpointError);
  EXPECT_FALSE(fs::exists(out)) << "the directory the save created is gone";
  EXPECT_TRUE(fs::exists(dir / "new")) << "the one that was there stays";
}
