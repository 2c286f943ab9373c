#include <d9d/distributed/launch.h>
#include <d9d/distributed/process_group.h>

#include <fmt/format.h>

#include <arpa/inet.h>
#include <csignal>
#include <cstring>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

extern char** environ;

namespace d9d::distributed {

namespace {

/// A TCP port free on the loopback now (the kernel's pick).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw DistributedError(std::string("launch_local: socket(): ") + std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const std::string error = std::strerror(errno);
    ::close(fd);
    throw DistributedError("launch_local: cannot find a free port: " + error + "; pass master_port");
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

bool launch_variable(const std::string& entry) {
  for (const char* name : {"RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "LOCAL_WORLD_SIZE=", "GROUP_RANK=", "MASTER_ADDR=",
                           "MASTER_PORT=", "TORCHELASTIC_USE_AGENT_STORE=", "TORCHELASTIC_RESTART_COUNT="}) {
    if (entry.rfind(name, 0) == 0) return true;
  }
  return false;
}

}  // namespace

int LaunchResult::exit_code() const {
  if (first_failure < 0) return 0;
  for (const auto& r : ranks) {
    if (r.rank == first_failure) return r.signal ? 128 + r.signal : (r.exit_code ? r.exit_code : 1);
  }
  return 1;
}

std::string LaunchResult::describe_failures() const {
  std::string text;
  for (const auto& r : ranks) {
    if (r.signal == 0 && r.exit_code == 0) continue;
    if (r.stopped_by_launcher) {
      text += fmt::format("rank {} (pid {}) was stopped after rank {} failed\n", r.rank, r.pid, first_failure);
    } else if (r.signal) {
      text += fmt::format("rank {} (pid {}) was killed by signal {} ({})\n", r.rank, r.pid, r.signal,
                          ::strsignal(r.signal));
    } else {
      text += fmt::format("rank {} (pid {}) exited with code {}\n", r.rank, r.pid, r.exit_code);
    }
  }
  return text;
}

LaunchResult launch_local(const std::vector<std::string>& argv, int64_t nproc, const LocalLaunchOptions& options) {
  if (argv.empty()) throw DistributedError("launch_local: argv is empty; argv[0] is the program to run");
  if (nproc < 1 || nproc > 1024) {
    throw DistributedError(fmt::format("launch_local: nproc must be in [1, 1024], got {}", nproc));
  }
  const int port = options.master_port() > 0 ? options.master_port() : free_port();

  std::vector<std::string> base_env;
  for (char** e = environ; *e != nullptr; ++e) {
    if (!launch_variable(*e)) base_env.emplace_back(*e);
  }
  // Ctrl-C goes to every rank (the terminal signals the whole process group);
  // the launcher itself keeps waiting for them.
  struct sigaction ignore {}, previous_int{};
  ignore.sa_handler = SIG_IGN;
  ::sigaction(SIGINT, &ignore, &previous_int);
  struct RestoreSignals {
    struct sigaction& i;
    ~RestoreSignals() { ::sigaction(SIGINT, &i, nullptr); }
  } restore{previous_int};

  LaunchResult result;
  std::vector<pid_t> pids;
  for (int64_t rank = 0; rank < nproc; ++rank) {
    std::vector<std::string> env = base_env;
    env.push_back(fmt::format("RANK={}", rank));
    env.push_back(fmt::format("WORLD_SIZE={}", nproc));
    env.push_back(fmt::format("LOCAL_RANK={}", rank));
    env.push_back(fmt::format("LOCAL_WORLD_SIZE={}", nproc));
    env.push_back("GROUP_RANK=0");
    env.push_back("MASTER_ADDR=127.0.0.1");
    env.push_back(fmt::format("MASTER_PORT={}", port));
    std::vector<char*> c_env, c_argv;
    for (auto& s : env) c_env.push_back(s.data());
    c_env.push_back(nullptr);
    std::vector<std::string> args = argv;
    for (auto& s : args) c_argv.push_back(s.data());
    c_argv.push_back(nullptr);
    const pid_t pid = ::fork();
    if (pid < 0) {
      const std::string error = std::strerror(errno);
      for (pid_t p : pids) ::kill(p, SIGKILL);
      for (pid_t p : pids) ::waitpid(p, nullptr, 0);
      throw DistributedError(fmt::format("launch_local: cannot start rank {}: fork(): {}", rank, error));
    }
    if (pid == 0) {
      ::signal(SIGINT, SIG_DFL);
      ::execve(c_argv[0], c_argv.data(), c_env.data());
      const std::string message = fmt::format("launch_local: cannot run {} as rank {}: {}\n", argv[0], rank,
                                              std::strerror(errno));
      (void)!::write(STDERR_FILENO, message.data(), message.size());
      ::_exit(127);
    }
    pids.push_back(pid);
    RankExit r;
    r.rank = rank;
    r.pid = pid;
    result.ranks.push_back(r);
  }

  // Wait for all; once one fails, give the others `grace` to end by themselves.
  size_t running = pids.size();
  std::vector<bool> done(pids.size(), false);
  std::chrono::steady_clock::time_point deadline{};
  int escalation = 0;  // 0: none yet, 1: SIGTERM sent, 2: SIGKILL sent
  while (running > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, result.first_failure >= 0 ? WNOHANG : 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (pid > 0) {
      // This and every other rank that has already ended: when a rank dies,
      // the others fail right after it, and the one a signal ended is the
      // likelier cause than those that exited with an error.
      std::vector<std::pair<pid_t, int>> ended{{pid, status}};
      for (pid_t more; running > ended.size() && (more = ::waitpid(-1, &status, WNOHANG)) > 0;) {
        ended.emplace_back(more, status);
      }
      int64_t failed = -1, signalled = -1;
      for (const auto& [p, st] : ended) {
        for (size_t k = 0; k < pids.size(); ++k) {
          if (pids[k] != p || done[k]) continue;
          done[k] = true;
          --running;
          RankExit& r = result.ranks[k];
          if (WIFSIGNALED(st)) r.signal = WTERMSIG(st);
          if (WIFEXITED(st)) r.exit_code = WEXITSTATUS(st);
          r.stopped_by_launcher = escalation > 0 && (r.signal == SIGTERM || r.signal == SIGKILL);
          if (r.signal != 0 && signalled < 0) signalled = r.rank;
          if ((r.signal != 0 || r.exit_code != 0) && failed < 0) failed = r.rank;
        }
      }
      if (failed >= 0 && result.first_failure < 0) {
        result.first_failure = signalled >= 0 ? signalled : failed;
        deadline = std::chrono::steady_clock::now() + options.grace();
      }
      continue;
    }
    // WNOHANG and nothing ended: past the grace period, stop the rest.
    if (std::chrono::steady_clock::now() >= deadline && escalation < 2) {
      ++escalation;
      for (size_t k = 0; k < pids.size(); ++k) {
        if (!done[k]) ::kill(pids[k], escalation == 1 ? SIGTERM : SIGKILL);
      }
      deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return result;
}

}  // namespace d9d::distributed
