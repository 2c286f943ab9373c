// AtomicFile, PendingFiles and remove_stale_partial_files: every file this
// library writes appears whole or not at all.
#include "test_util.h"

#include <d9d/model_state/io/atomic_file.h>
#include <d9d/model_state/io/stream.h>
#include <d9d/model_state/mapper/adapters.h>

#include <torch/nn/modules/linear.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <string>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

namespace fs = std::filesystem;
namespace ms = d9d::model_state;
using d9d_test::read_bytes;
using d9d_test::TempDir;
using ::testing::HasSubstr;

std::set<std::string> files_in(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.insert(entry.path().filename().string());
  return names;
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

/// The one temporary-name scheme: `<path>.tmp-<our pid>-<8 hex digits>`.
void expect_temporary_name_of(const std::string& tmp, const std::string& path) {
  const std::regex scheme(std::regex_replace(path, std::regex(R"([.^$|()\[\]{}*+?\\])"), R"(\$&)") + R"(\.tmp-)" +
                          std::to_string(::getpid()) + "-[0-9a-f]{8}");
  EXPECT_TRUE(std::regex_match(tmp, scheme)) << tmp << " is not " << path << ".tmp-PID-XXXXXXXX";
}

/// A PID no process has: a child's, once it has exited and been reaped.
pid_t dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  int status = 0;
  ::waitpid(child, &status, 0);
  return child;
}

bool runs(pid_t pid) { return ::kill(pid, 0) == 0 || errno != ESRCH; }

TEST(AtomicFile, CommitPutsExactlyTheBytesInPlaceAndLeavesNoTemporaryFile) {
  TempDir dir;
  const std::string path = dir / "data.bin";
  const std::string first("head\0with a NUL", 15), second(100000, 'x');
  {
    ms::AtomicFile file(path);
    expect_temporary_name_of(file.temporary_path(), path);
    file.write(first.data(), first.size());
    file.write(second.data(), second.size());
    EXPECT_TRUE(fs::exists(file.temporary_path()));
    EXPECT_FALSE(fs::exists(path)) << "nothing at the final name before commit()";
    file.commit();
  }
  EXPECT_EQ(read_bytes(path), first + second);
  EXPECT_EQ(files_in(dir.path), std::set<std::string>{"data.bin"});
}

TEST(AtomicFile, DestroyedWithoutCommitLeavesTheOldFileAndNoTemporaryFile) {
  TempDir dir;
  const std::string path = dir / "data.bin";
  write_text(path, "old contents");
  std::string tmp;
  {
    ms::AtomicFile file(path);
    tmp = file.temporary_path();
    file.write("new", 3);
    EXPECT_TRUE(fs::exists(tmp));
  }
  EXPECT_FALSE(fs::exists(tmp));
  EXPECT_EQ(read_bytes(path), "old contents");
  EXPECT_EQ(files_in(dir.path), std::set<std::string>{"data.bin"});
}

TEST(AtomicFile, ADirectoryThatDoesNotExistIsACheckpointErrorNamingThePath) {
  TempDir dir;
  const std::string path = dir / "missing/data.bin";
  try {
    ms::AtomicFile file(path);
    ADD_FAILURE() << "no error";
  } catch (const ms::CheckpointError& e) {
    EXPECT_THAT(e.what(), HasSubstr(path + ": cannot create "));
    EXPECT_THAT(e.what(), HasSubstr("No such file or directory"));
  }
}

TEST(PendingFiles, CommitPutsEveryFileInPlace) {
  TempDir dir;
  write_text(dir / "b.json", "old b");
  ms::PendingFiles pending(dir.str(), /*created_dir=*/false);
  const std::string a = pending.add("a.safetensors"), b = pending.add("b.json");
  expect_temporary_name_of(a, dir / "a.safetensors");
  expect_temporary_name_of(b, dir / "b.json");
  ms::write_file_atomically(a, "contents of a");
  ms::write_file_atomically(b, "new b");
  EXPECT_FALSE(fs::exists(dir / "a.safetensors")) << "nothing in place before commit()";
  EXPECT_EQ(read_bytes(dir / "b.json"), "old b");
  pending.commit();
  EXPECT_EQ(read_bytes(dir / "a.safetensors"), "contents of a");
  EXPECT_EQ(read_bytes(dir / "b.json"), "new b");
  EXPECT_EQ(files_in(dir.path), (std::set<std::string>{"a.safetensors", "b.json"}));
}

TEST(PendingFiles, DestroyedUncommittedLeavesNothingAndRemovesTheDirectoryItCreated) {
  TempDir tmp;
  const std::string created = tmp / "created", existing = tmp / "existing";
  fs::create_directories(created);
  fs::create_directories(existing);
  write_text(existing + "/config.json", "{}");
  {
    ms::PendingFiles in_created(created, /*created_dir=*/true), in_existing(existing, /*created_dir=*/false);
    for (ms::PendingFiles* pending : {&in_created, &in_existing}) {
      const std::string one = pending->add("model-1.safetensors"), two = pending->add("model-2.safetensors");
      ms::write_file_atomically(one, "1");
      ms::write_file_atomically(two, "2");
      EXPECT_TRUE(fs::exists(one) && fs::exists(two));
    }
  }
  EXPECT_FALSE(fs::exists(created));
  EXPECT_EQ(files_in(existing), std::set<std::string>{"config.json"});
}

TEST(PendingFiles, ACreatedDirectoryThatIsNotEmptyStays) {
  TempDir tmp;
  const std::string created = tmp / "created";
  fs::create_directories(created);
  {
    ms::PendingFiles pending(created, /*created_dir=*/true);
    ms::write_file_atomically(pending.add("model.safetensors"), "1");
    write_text(created + "/notes.txt", "someone else's");
  }
  EXPECT_EQ(files_in(created), std::set<std::string>{"notes.txt"});
}

TEST(PendingFiles, AFailedRenameRemovesTheRestAndSaysHowManyWerePutInPlace) {
  TempDir dir;
  // "b" is a non-empty directory: renaming a file onto it fails.
  fs::create_directories(dir.path / "b/inside");
  ms::PendingFiles pending(dir.str(), /*created_dir=*/false);
  const std::string a = pending.add("a"), b = pending.add("b"), c = pending.add("c");
  for (const auto& path : {a, b, c}) ms::write_file_atomically(path, "x");
  try {
    pending.commit();
    ADD_FAILURE() << "no error";
  } catch (const ms::CheckpointError& e) {
    EXPECT_THAT(e.what(), HasSubstr(dir.str() + ": cannot rename " + b + " to b: "));
    EXPECT_THAT(e.what(), HasSubstr("(1 of 3 files were put in place)"));
  }
  EXPECT_EQ(read_bytes(dir / "a"), "x");
  EXPECT_EQ(files_in(dir.path), (std::set<std::string>{"a", "b"}));
}

TEST(SaveModelState, AShardThatCannotBePutInPlaceLeavesNoTemporaryFile) {
  TempDir dir;
  fs::create_directories(dir.path / "model.safetensors/keep");
  torch::nn::Linear model(2, 2);
  EXPECT_THROW(ms::save_model_state(dir.str(), *ms::identity_mapper_from_module(*model), *model, d9d_test::quiet_save()),
               ms::CheckpointError);
  EXPECT_EQ(files_in(dir.path), std::set<std::string>{"model.safetensors"});
}

TEST(RemoveStalePartialFiles, RemovesEachSchemeOfADeadWriterAndKeepsALiveOnes) {
  TempDir dir;
  const pid_t dead = dead_pid(), live = ::getppid();
  ASSERT_FALSE(runs(dead)) << dead;
  ASSERT_TRUE(runs(live)) << live;
  auto names_for = [](pid_t pid) {
    const std::string p = std::to_string(pid);
    return std::vector<std::string>{
        "model.safetensors.tmp-" + p + "-0badf00d",           // AtomicFile, PendingFiles
        "model-00001-of-00002.safetensors.partial-" + p,      // older save_model_state shards
        ".model.safetensors.d9d-partial-" + p,                // older d9d-peft merge
    };
  };
  for (const auto& name : names_for(dead)) write_text(dir / name, "half a file");
  for (const auto& name : names_for(live)) write_text(dir / name, "being written");
  write_text(dir / "model.safetensors", "a checkpoint");

  EXPECT_EQ(ms::remove_stale_partial_files(dir.str()), 3u);
  for (const auto& name : names_for(dead)) EXPECT_FALSE(fs::exists(dir / name)) << name;
  for (const auto& name : names_for(live)) EXPECT_TRUE(fs::exists(dir / name)) << name;
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  EXPECT_EQ(ms::remove_stale_partial_files(dir.str()), 0u);
}

}  // namespace
