#pragma once
// Runs N copies of a program on this machine as the ranks of one data-parallel
// job, with the environment torchrun gives its workers (RANK, WORLD_SIZE,
// LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and no Python.
//
// ```
// if (!d9d::distributed::LaunchEnv::from_environment()) {   // the launcher
//   return d9d::distributed::launch_local({"/proc/self/exe", "--my-flag"}, 4).exit_code();
// }
// auto group = d9d::distributed::init_process_group();      // a rank
// ```

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace d9d::distributed {

struct LocalLaunchOptions {
  /// The rendezvous port; 0 picks a free one.
  LocalLaunchOptions& master_port(int port) {
    master_port_ = port;
    return *this;
  }
  /// After one rank fails, how long the others get to end on their own
  /// (they normally notice at once) before they are sent SIGTERM, then SIGKILL.
  LocalLaunchOptions& grace(std::chrono::milliseconds grace) {
    grace_ = grace;
    return *this;
  }
  int master_port() const { return master_port_; }
  std::chrono::milliseconds grace() const { return grace_; }

 private:
  int master_port_ = 0;
  std::chrono::milliseconds grace_ = std::chrono::seconds(30);
};

/// How each rank ended.
struct RankExit {
  int64_t rank = 0;
  int64_t pid = 0;
  int exit_code = 0;  // when it exited
  int signal = 0;     // when a signal ended it (0 otherwise)
  bool stopped_by_launcher = false;  // sent SIGTERM/SIGKILL after another rank failed
};

struct LaunchResult {
  std::vector<RankExit> ranks;
  /// The rank that failed first, or -1 when all succeeded.
  int64_t first_failure = -1;
  /// 0 when every rank succeeded; else the first failed rank's exit code
  /// (128 + signal when a signal ended it).
  int exit_code() const;
  /// One line per failed rank ("rank 1 (pid 4242) was killed by signal 9 (Killed)").
  std::string describe_failures() const;
};

/// Starts `argv` (argv[0] is the program's path; "/proc/self/exe" runs this
/// one again) as ranks 0 .. nproc-1 and waits for all of them. Ctrl-C reaches
/// every rank (they share the terminal's process group) and the launcher
/// waits for them to finish. Throws `DistributedError` when a rank cannot be
/// started.
LaunchResult launch_local(const std::vector<std::string>& argv, int64_t nproc, const LocalLaunchOptions& options = {});

}  // namespace d9d::distributed
