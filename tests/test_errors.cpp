// One error root: every error path of the model_state and nn API and of
// parse_peft_config throws a d9d::Error, of the documented subclass, whose
// message names the file or key at fault. Anything else thrown (c10::Error,
// std::filesystem::filesystem_error, nlohmann's exceptions) escapes the
// helper below and fails the test.
#include "test_util.h"
#include "toy_model.h"

#include <d9d/error.h>
#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/io/source.h>
#include <d9d/model_state/io/stream.h>
#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>
#include <d9d/model_state/mapper/compose/parallel.h>
#include <d9d/model_state/mapper/leaf/identity.h>
#include <d9d/model_state/mapper/leaf/rename.h>
#include <d9d/model_state/mapper/leaf/transpose.h>
#include <d9d/nn/embedding.h>
#include <d9d/nn/linear.h>
#include <d9d/peft/all/config.h>
#include <d9d/peft/applicator.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/method.h>

#include <torch/serialize.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <vector>

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
namespace peft = d9d::peft;
using ::testing::HasSubstr;
using namespace d9d_test;

namespace {

/// Runs `statement`, which must throw: caught as `d9d::Error` (what a caller
/// catching the root sees), it must be a `Type`, and its message must hold
/// every one of `parts`. Returns the message.
template <class Type, class Statement>
std::string expect_error(const char* file, int line, Statement statement, const std::vector<std::string>& parts) {
  static_assert(std::is_base_of_v<d9d::Error, Type>);
  ::testing::ScopedTrace trace(file, line, "expected a " + std::string(typeid(Type).name()));
  try {
    statement();
  } catch (const d9d::Error& error) {
    EXPECT_NE(dynamic_cast<const Type*>(&error), nullptr)
        << "caught a " << typeid(error).name() << " instead: " << error.what();
    for (const auto& part : parts) EXPECT_THAT(error.what(), HasSubstr(part));
    return error.what();
  }
  ADD_FAILURE() << "nothing was thrown";
  return "";
}

#define EXPECT_D9D_ERROR(Type, statement, ...) \
  expect_error<Type>(__FILE__, __LINE__, [&] { statement; }, std::vector<std::string>{__VA_ARGS__})

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

/// A safetensors file made of a header text and a data section.
std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + data;
}

const std::string kHeaderA = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
const std::string kDataA(8, '\0');

/// A module with one parameter and one buffer: `weight` [2, 3] and `b` [4].
struct SmallImpl : torch::nn::Module {
  SmallImpl() {
    register_parameter("weight", torch::zeros({2, 3}));
    register_buffer("b", torch::zeros({4}));
  }
};
TORCH_MODULE(Small);

}  // namespace

TEST(Errors, EveryRootDerivesFromTheOneRootAndKeepsItsAccessors) {
  static_assert(std::is_base_of_v<d9d::Error, peft::PeftError>);
  static_assert(std::is_base_of_v<d9d::Error, peft::ConfigError>);
  static_assert(std::is_base_of_v<d9d::Error, ms::MapperError>);
  static_assert(std::is_base_of_v<d9d::Error, ms::StateLoadError>);
  static_assert(std::is_base_of_v<d9d::Error, ms::CheckpointError>);
  static_assert(std::is_base_of_v<std::runtime_error, d9d::Error>);
  EXPECT_THROW(throw peft::ConfigError("params.r", "must be >= 1"), d9d::Error);
  const peft::ConfigError config("params.r", "must be >= 1, got 0");
  EXPECT_EQ(config.path(), "params.r");
  EXPECT_STREQ(config.what(), "params.r: must be >= 1, got 0");
  ms::LoadReport report;
  report.missing_keys = {"w"};
  const ms::StateLoadError load("load failed", report);
  EXPECT_EQ(load.report().missing_keys, std::vector<std::string>{"w"});
}

// ------------------------------------------------------- reading checkpoints

TEST(Errors, AMissingCheckpointNamesThePath) {
  TempDir dir;
  const std::string absent = dir / "absent.safetensors";
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::open_checkpoint(absent), absent + ": no such file or directory");
  Small model;
  EXPECT_D9D_ERROR(ms::CheckpointError,
                   ms::load_model_state(absent, *ms::identity_mapper_from_module(*model), *model, quiet()),
                   absent + ": no such file or directory");
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::SafetensorsFile::open(absent), absent + ": cannot open");
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::open_checkpoint(dir.str()), dir.str() + ": directory holds neither");
}

TEST(Errors, MalformedSafetensorsNameTheFileAndKey) {
  TempDir dir;
  const std::string path = dir / "bad.safetensors";
  write_bytes(path, safetensors_bytes(R"({"a":{"dtype":"F32",)", kDataA));
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::open_checkpoint(path), path + ": the header is not valid JSON");

  write_bytes(path, "abc");
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::open_checkpoint(path), path + ": truncated: 3 bytes");
  write_bytes(path, safetensors_bytes(kHeaderA, kDataA).substr(0, 8 + kHeaderA.size() + 5));
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::open_checkpoint(path), path + ": tensor 'a'", "truncated file?");

  write_bytes(path, safetensors_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", kDataA));
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::open_checkpoint(path),
                   path + ": tensor 'a': data_offsets [0,16] run past the data section (8 bytes)");

  write_bytes(path, safetensors_bytes(kHeaderA, kDataA));
  auto file = ms::SafetensorsFile::open(path);
  EXPECT_D9D_ERROR(ms::CheckpointError, file->get("zzz"), path + ": no tensor 'zzz'");
  ms::Parallel wants_b({std::make_shared<ms::Identity>("b")});
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::read_model_state(*ms::open_checkpoint(path), wants_b, [](ms::StateDict) {}),
                   path + ": no tensor 'b'");
}

TEST(Errors, BrokenShardedAndTorchSaveCheckpointsNameTheFileAndKey) {
  TempDir dir;
  const std::string index = dir / "model.safetensors.index.json";
  write_bytes(index, R"({"weight_map":{"w":"model-00001-of-00002.safetensors"}})");
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::open_checkpoint(dir.str()),
                   index + ": key 'w' is mapped to shard 'model-00001-of-00002.safetensors', which does not exist");
  write_bytes(index, R"({"weight_map":{"w":"../elsewhere.safetensors"}})");
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::open_checkpoint(index), index + ": weight_map['w']");

  const std::string pt = dir / "list.pt";
  torch::save(std::vector<torch::Tensor>{torch::ones({1})}, pt);
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::open_checkpoint(pt), pt + ":");
}

TEST(Errors, APathTheSystemCannotResolveIsACheckpointErrorWithTheReason) {
  TempDir dir;
  // A name longer than any file system allows: stat fails with ENAMETOOLONG,
  // which is not "no such file".
  const std::string too_long = dir / (std::string(300, 'x') + ".safetensors");
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::open_checkpoint(too_long), too_long + ": cannot access",
                   "File name too long");

  // A directory whose own path fits PATH_MAX but whose index path does not:
  // looking for the index used to throw std::filesystem::filesystem_error.
  fs::path deep = dir.path;
  const size_t length = 4080;
  while (deep.string().size() + 250 < length) deep /= std::string(200, 'd');
  deep /= std::string(length - deep.string().size() - 1, 'e');
  ASSERT_EQ(deep.string().size(), length);
  fs::create_directories(deep);
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::open_checkpoint(deep.string()),
                   "model.safetensors.index.json: File name too long");
}

// ------------------------------------------------------------------- loading

TEST(Errors, AStrictLoadWithAMissingKeyIsAStateLoadErrorNamingIt) {
  Small model;
  const ms::StateDict only_weight{{"weight", torch::ones({2, 3})}};
  try {
    ms::load_state_dict(*model, only_weight, quiet());
    FAIL() << "expected StateLoadError";
  } catch (const d9d::Error& error) {
    const auto* load = dynamic_cast<const ms::StateLoadError*>(&error);
    ASSERT_NE(load, nullptr) << "caught a " << typeid(error).name();
    EXPECT_THAT(error.what(), HasSubstr("model keys no source provides (1): b"));
    EXPECT_EQ(load->report().missing_keys, std::vector<std::string>{"b"});
  }
  EXPECT_TRUE(torch::equal(model->named_parameters()["weight"], torch::zeros({2, 3}))) << "nothing is loaded";
}

TEST(Errors, AnUndefinedTensorInAStateDictIsReportedNotACrash) {
  Small model;
  const ms::StateDict state{{"weight", at::Tensor()}, {"b", torch::ones({4})}};
  EXPECT_D9D_ERROR(ms::StateLoadError, ms::load_state_dict(*model, state, quiet()),
                   "weight: model [2, 3] Float, source [] undefined");
}

TEST(Errors, ADeviceTheBuildLacksIsAStateLoadError) {
  Small model;
  const ms::StateDict state{{"weight", torch::ones({2, 3})}, {"b", torch::ones({4})}};
  auto options = quiet();
  options.device = c10::Device(c10::kCUDA, 99);
  EXPECT_D9D_ERROR(ms::StateLoadError, ms::load_state_dict(*model, state, options),
                   "cannot move the model to cuda:99", "LoadOptions::device");
}

TEST(Errors, AModelTensorThatRefusesTheWriteIsAStateLoadErrorNamingTheKey) {
  struct ExpandedImpl : torch::nn::Module {
    // Four elements sharing one memory location: copy_ into it fails.
    ExpandedImpl() { register_buffer("shared", torch::zeros({1}).expand({4})); }
  };
  auto model = std::make_shared<ExpandedImpl>();
  const ms::StateDict state{{"shared", torch::ones({4})}};
  EXPECT_D9D_ERROR(ms::StateLoadError, ms::load_state_dict(*model, state, quiet()),
                   "<state dict>: cannot copy 'shared' into the model");
}

TEST(Errors, MappersComposedOrAppliedWronglyAreMapperErrorsNamingTheKeys) {
  EXPECT_D9D_ERROR(ms::MapperError,
                   ms::Parallel({std::make_shared<ms::Rename>("a", "x"), std::make_shared<ms::Rename>("b", "x")}),
                   "output key 'x' is written by two mappers");
  Small model;
  ms::Parallel transpose_b({std::make_shared<ms::Identity>("weight"), std::make_shared<ms::Transpose>("b", 0, 1)});
  const ms::StateDict state{{"weight", torch::ones({2, 3})}, {"b", torch::ones({4})}};
  EXPECT_D9D_ERROR(ms::MapperError, ms::load_state_dict(*model, state, transpose_b, quiet()),
                   "Transpose: cannot transform 'b' (shape [4])");
}

// ------------------------------------------------------------------- writing

TEST(Errors, ADirectoryThatCannotBeCreatedIsACheckpointErrorWithTheReason) {
  TempDir dir;
  const std::string blocker = dir / "blocker";
  write_bytes(blocker, "a file, not a directory");
  const std::string target = blocker + "/checkpoint";
  Small model;
  const auto mapper = ms::identity_mapper_from_module(*model);
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::save_model_state(target, *mapper, *model, quiet_save()),
                   "save to " + target + ": cannot create the directory: Not a directory");
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::save_model_state(blocker, *mapper, *model, quiet_save()),
                   "save to " + blocker + ":");
}

TEST(Errors, AShardThatCannotBePutInPlaceIsACheckpointErrorAndLeavesNoPartialFile) {
  TempDir dir;
  // model.safetensors is a non-empty directory: the rename onto it fails.
  fs::create_directories(dir.path / "model.safetensors");
  write_bytes(dir / "model.safetensors/keep", "x");
  Small model;
  EXPECT_D9D_ERROR(ms::CheckpointError,
                   ms::save_model_state(dir.str(), *ms::identity_mapper_from_module(*model), *model, quiet_save()),
                   "save to " + dir.str() + ": cannot rename", "model.safetensors");
  for (const auto& entry : fs::directory_iterator(dir.path)) {
    EXPECT_EQ(entry.path().filename().string().find(".tmp-"), std::string::npos) << entry.path();
  }
}

TEST(Errors, AnOldFileThatCannotBeRemovedIsACheckpointErrorNamingIt) {
  TempDir dir;
  // An old sharded checkpoint whose "shard" is a non-empty directory, which
  // removing a file cannot remove. Left behind, the old index would be read
  // instead of the new model.safetensors.
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map":{"weight":"old-shard"}})");
  fs::create_directories(dir.path / "old-shard");
  write_bytes(dir / "old-shard/keep", "x");
  Small model;
  EXPECT_D9D_ERROR(ms::CheckpointError,
                   ms::save_model_state(dir.str(), *ms::identity_mapper_from_module(*model), *model, quiet_save()),
                   "save to " + dir.str() + ": the new checkpoint is written", "old-shard (");
  EXPECT_FALSE(fs::exists(dir.path / "model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(dir.path / "model.safetensors"));
}

TEST(Errors, TensorsSafetensorsCannotHoldNameTheFileAndKey) {
  TempDir dir;
  const std::string path = dir / "out.safetensors";
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::save_safetensors(path, {{"z", torch::ones({2}, torch::kComplexFloat)}}),
                   path + ": tensor 'z' has dtype ComplexFloat");
  EXPECT_D9D_ERROR(ms::CheckpointError,
                   ms::save_safetensors(path, {{"m", torch::empty({2}, torch::TensorOptions().device(torch::kMeta))}}),
                   path + ": tensor 'm' is on the meta device");
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::save_safetensors(path, {{"s", torch::ones({2, 2}).to_sparse()}}),
                   path + ": tensor 's' is not dense");
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::save_safetensors(path, {{"bad\xff", torch::ones({1})}}),
                   path + ": key", "is not valid UTF-8");
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::save_safetensors(path, {{"w", torch::ones({1})}}, {{"note", "\xfe"}}),
                   path + ": __metadata__ value", "is not valid UTF-8");
  EXPECT_FALSE(fs::exists(path));
  ms::SafetensorsIndex index;
  index.weight_map = {{"w\xff", "model-00001-of-00001.safetensors"}};
  EXPECT_D9D_ERROR(ms::CheckpointError, ms::dump_safetensors_index(index), "safetensors index: key",
                   "is not valid UTF-8");
}

// ------------------------------------------------------------------ nn layers

TEST(Errors, BadLayerOptionsAreConfigErrorsNamingTheField) {
  EXPECT_D9D_ERROR(peft::ConfigError, d9d::nn::Linear(-1, 4), "LinearOptions.in_features: must be >= 0, got -1");
  EXPECT_D9D_ERROR(peft::ConfigError, d9d::nn::Embedding(torch::nn::EmbeddingOptions(5, 2).padding_idx(5)),
                   "EmbeddingOptions.padding_idx: must be within [-5, 5) for num_embeddings 5, got 5");
  EXPECT_D9D_ERROR(peft::ConfigError, d9d::nn::Embedding(torch::nn::EmbeddingOptions(5, 2)._weight(torch::ones({5}))),
                   "EmbeddingOptions._weight: has shape [5]");
  EXPECT_D9D_ERROR(peft::ConfigError, d9d::nn::Embedding(-2, 4), "EmbeddingOptions.num_embeddings: must be >= 0");
  // As Python's nn.Linear: no inputs is a valid (if useless) layer.
  EXPECT_NO_THROW(d9d::nn::Linear(0, 4));
}

TEST(Errors, ALayerWhoseWrapperWasDroppedIsAPeftError) {
  toy::Toy model;
  peft::LoRA lora({"lm_head", peft::LoRAParameters().r(2).alpha(4)});
  peft::inject_peft_and_freeze(lora, *model);
  model->replace_module("lm_head", d9d::nn::Linear(16, 37).ptr());
  EXPECT_D9D_ERROR(peft::PeftError, model->lm_head(torch::ones({1, 16})),
                   "was removed from the module tree without merge_peft");
}

// ------------------------------------------------------------- configuration

TEST(Errors, ParsePeftConfigErrorsAreConfigErrorsNamingThePath) {
  EXPECT_D9D_ERROR(peft::ConfigError, peft::parse_peft_config("{not json", "run.json"), "run.json: not valid JSON");
  // nlohmann reports a number beyond double as out_of_range, not parse_error: still a ConfigError.
  EXPECT_D9D_ERROR(peft::ConfigError,
                   peft::parse_peft_config(R"({"kind":"lora","params":{"dropout":1e400}})", "run.json"),
                   "run.json: not valid JSON");
  const std::string kind = EXPECT_D9D_ERROR(peft::ConfigError, peft::parse_peft_config(R"({"kind":"qlora"})"),
                                            "kind: unknown kind \"qlora\"");
  EXPECT_EQ(kind.rfind("kind: ", 0), 0u) << "the message starts with the path";
  EXPECT_D9D_ERROR(peft::ConfigError,
                   peft::parse_peft_config(R"({"kind":"full_tune","module_name_pattern":"(unclosed"})"),
                   "module_name_pattern: invalid regular expression \"(unclosed\"");
  try {
    peft::parse_peft_config(R"({"kind":"stack","methods":[{"kind":"lora","module_name_pattern":"[",)"
                            R"("params":{"r":8,"alpha":16,"dropout":0}}]})");
    FAIL() << "expected ConfigError";
  } catch (const peft::ConfigError& error) {
    EXPECT_EQ(error.path(), "methods[0].module_name_pattern");
  }
}
