// Checkpoint loading: throughput and peak resident memory against the size of
// the checkpoint.
//
// Writes a checkpoint of random fp32 parameters (64 MiB each) with
// save_model_state, once as a single file and once sharded (256 MiB shards),
// then loads each with load_model_state into a freshly built module inside a
// forked child, so the peak resident set measured is that of the load alone.
// The child builds the module (its parameters resident), resets its
// high-water mark (/proc/self/clear_refs), loads, and reports VmHWM; the
// loader's overhead is that peak minus the resident set before the load. A
// plain read() of the same files is the baseline for the throughput.
//
// Both are measured with the files in the page cache (just written) and,
// where the kernel lets the cached pages go (posix_fadvise DONTNEED), cold.
//
//   bench_checkpoint [--size-gib N] [--dir DIR] [--keep]

#include <d9d/model_state/io/stream.h>
#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

namespace fs = std::filesystem;
namespace ms = d9d::model_state;

namespace {

constexpr int64_t kRows = 4096, kCols = 4096;  // 64 MiB of fp32 per parameter
constexpr uint64_t kParamBytes = kRows * kCols * sizeof(float);
constexpr uint64_t kShardSize = 256ull << 20;
constexpr double kMiB = 1024.0 * 1024.0, kGiB = kMiB * 1024.0;

struct Bench : torch::nn::Module {
  explicit Bench(int count, bool random) {
    for (int i = 0; i < count; ++i) {
      auto t = random ? torch::rand({kRows, kCols}) : torch::zeros({kRows, kCols});
      params.push_back(register_parameter("p" + std::to_string(i), t));
    }
  }
  std::vector<torch::Tensor> params;
};

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::vector<std::string> checkpoint_files(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  return files;
}

uint64_t total_bytes(const std::vector<std::string>& files) {
  uint64_t n = 0;
  for (const auto& f : files) n += fs::file_size(f);
  return n;
}

/// Asks the kernel to drop the files' cached pages (they were fsync'd, so
/// they are clean); `cached_fraction` says how far it obliged.
void drop_cache(const std::vector<std::string>& files) {
  for (const auto& f : files) {
    const int fd = ::open(f.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

/// The fraction of the files' pages in the page cache (mincore).
double cached_fraction(const std::vector<std::string>& files) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  uint64_t resident = 0, pages = 0;
  for (const auto& f : files) {
    const int fd = ::open(f.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    const size_t size = fs::file_size(f);
    void* addr = size ? ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
    ::close(fd);
    if (addr == MAP_FAILED) continue;
    std::vector<unsigned char> vec((size + page - 1) / page);
    if (::mincore(addr, size, vec.data()) == 0) {
      for (unsigned char v : vec) resident += v & 1;
      pages += vec.size();
    }
    ::munmap(addr, size);
  }
  return pages ? static_cast<double>(resident) / pages : 0.0;
}

/// Plain read() of every file through one reused 64 MiB buffer: seconds.
double read_baseline(const std::vector<std::string>& files) {
  std::vector<char> buffer(kParamBytes);
  const double t0 = now();
  for (const auto& f : files) {
    const int fd = ::open(f.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      std::perror(f.c_str());
      std::exit(1);
    }
    for (;;) {
      const ssize_t r = ::read(fd, buffer.data(), buffer.size());
      if (r < 0) {
        std::perror("read");
        std::exit(1);
      }
      if (r == 0) break;
    }
    ::close(fd);
  }
  return now() - t0;
}

uint64_t proc_status_kib(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(field);
  while (std::getline(in, line)) {
    if (line.compare(0, n, field) == 0 && line.size() > n && line[n] == ':') {
      return std::strtoull(line.c_str() + n + 1, nullptr, 10);
    }
  }
  return 0;
}

struct ChildResult {
  double load_seconds = 0;
  uint64_t rss_before_kib = 0;  // module built, nothing loaded
  uint64_t hwm_kib = 0;         // peak during the load
  int loaded = 0;
  int correct = 0;  // parameters whose checksum matches the saved one
  char error[512] = {};
};

/// Loads `dir` into a fresh module in a forked child; returns what it measured.
ChildResult load_in_child(const std::string& dir, int count, const std::vector<double>& checksums,
                          uint64_t* ru_maxrss_kib) {
  int fds[2];
  if (::pipe(fds) != 0) {
    std::perror("pipe");
    std::exit(1);
  }
  const pid_t pid = ::fork();
  if (pid < 0) {
    std::perror("fork");
    std::exit(1);
  }
  if (pid == 0) {
    ::close(fds[0]);
    ChildResult r;
    try {
      Bench model(count, /*random=*/false);
      r.rss_before_kib = proc_status_kib("VmRSS");
      {
        std::ofstream clear("/proc/self/clear_refs");
        clear << "5";  // resets VmHWM to the current resident set
      }
      ms::LoadOptions options;
      options.progress = ms::no_progress();
      const auto mapper = ms::identity_mapper_from_module(model);
      const double t0 = now();
      const ms::LoadReport report = ms::load_model_state(dir, *mapper, model, options);
      r.load_seconds = now() - t0;
      r.hwm_kib = proc_status_kib("VmHWM");
      r.loaded = static_cast<int>(report.loaded_keys.size());
      for (int i = 0; i < count; ++i) {
        r.correct += model.params[i].sum(torch::kDouble).item<double>() == checksums[i];
      }
    } catch (const std::exception& e) {
      std::snprintf(r.error, sizeof(r.error), "%s", e.what());
    }
    const ssize_t w = ::write(fds[1], &r, sizeof(r));
    ::_exit(w == static_cast<ssize_t>(sizeof(r)) ? 0 : 1);
  }
  ::close(fds[1]);
  ChildResult r;
  size_t got = 0;
  while (got < sizeof(r)) {
    const ssize_t n = ::read(fds[0], reinterpret_cast<char*>(&r) + got, sizeof(r) - got);
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fds[0]);
  int status = 0;
  struct rusage usage {};
  ::wait4(pid, &status, 0, &usage);
  *ru_maxrss_kib = static_cast<uint64_t>(usage.ru_maxrss);
  if (got != sizeof(r) || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "load child failed (status %d)\n", status);
    std::exit(1);
  }
  if (r.error[0]) {
    std::fprintf(stderr, "load failed: %s\n", r.error);
    std::exit(1);
  }
  return r;
}

void usage() {
  std::fprintf(stderr, "usage: bench_checkpoint [--size-gib N] [--dir DIR] [--keep]\n");
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  double size_gib = 1;
  std::string dir;
  bool keep = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--size-gib" && i + 1 < argc) {
      size_gib = std::atof(argv[++i]);
      if (!(size_gib > 0)) usage();
    } else if (arg == "--dir" && i + 1 < argc) {
      dir = argv[++i];
    } else if (arg == "--keep") {
      keep = true;
    } else {
      usage();
    }
  }
  bool made_dir = false;
  if (dir.empty()) {
    std::string tmpl = (fs::temp_directory_path() / "d9d-bench-checkpoint.XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) {
      std::perror("mkdtemp");
      return 1;
    }
    dir = tmpl;
    made_dir = true;
  }
  torch::manual_seed(0);
  torch::NoGradGuard no_grad;
  const int count = std::max(1, static_cast<int>(std::ceil(size_gib * kGiB / kParamBytes)));
  const std::string single = (fs::path(dir) / "single").string();
  const std::string sharded = (fs::path(dir) / "sharded").string();

  std::vector<double> checksums;
  {
    std::printf("writing %d fp32 parameters of %.0f MiB (%.2f GiB) to %s\n", count, kParamBytes / kMiB,
                count * kParamBytes / kGiB, dir.c_str());
    std::fflush(stdout);
    Bench model(count, /*random=*/true);
    for (const auto& p : model.params) checksums.push_back(p.sum(torch::kDouble).item<double>());
    const auto mapper = ms::identity_mapper_from_module(model);
    for (const auto& [path, shard_size] : {std::pair{single, uint64_t{0}}, std::pair{sharded, kShardSize}}) {
      ms::SaveOptions options;
      options.shard_size = shard_size;
      options.progress = ms::no_progress();
      const double t0 = now();
      ms::save_model_state(path, *mapper, model, options);
      const double s = now() - t0;
      const auto files = checkpoint_files(path);
      std::printf("  saved %-7s %zu file(s), %.3f GiB in %.2f s (%.2f GB/s, incl. fsync)\n",
                  path == single ? "single" : "sharded", files.size(), total_bytes(files) / kGiB, s,
                  total_bytes(files) / 1e9 / s);
    }
  }  // the model is freed here, before any child is forked

  std::printf("\n%-8s %-5s %9s %9s %9s %10s %9s %12s %12s %12s\n", "layout", "cache", "size GiB", "read s",
              "read GB/s", "load s", "load GB/s", "load/read", "peak RSS MiB", "overhead MiB");
  bool ok = true;
  for (const auto& [name, path] : {std::pair{"single", single}, std::pair{"sharded", sharded}}) {
    const auto files = checkpoint_files(path);
    const uint64_t bytes = total_bytes(files);
    for (const bool cold : {false, true}) {
      if (cold) drop_cache(files);
      const double read_cached = cached_fraction(files);
      const double read_s = read_baseline(files);
      if (cold) drop_cache(files);
      const double load_cached = cached_fraction(files);
      uint64_t ru_maxrss = 0;
      const ChildResult r = load_in_child(path, count, checksums, &ru_maxrss);
      const double read_gbs = bytes / 1e9 / read_s, load_gbs = bytes / 1e9 / r.load_seconds;
      const double peak_mib = r.hwm_kib / 1024.0;
      const double overhead_mib = (static_cast<double>(r.hwm_kib) - static_cast<double>(r.rss_before_kib)) / 1024.0;
      std::printf("%-8s %-5s %9.3f %9.3f %9.2f %10.3f %9.2f %12.2f %12.0f %12.0f\n", name, cold ? "cold" : "warm",
                  bytes / kGiB, read_s, read_gbs, r.load_seconds, load_gbs, load_gbs / read_gbs, peak_mib,
                  overhead_mib);
      std::printf("         (child: RSS %.0f MiB before the load = %.0f MiB parameters + %.0f MiB process; "
                  "peak - parameters = %.0f MiB; wait4 ru_maxrss %.0f MiB incl. the checksum pass after the load; %d/%d keys loaded, %d/%d checksums match;\n"
                  "          %.0f%% of the file pages cached before the read, %.0f%% before the load)\n",
                  r.rss_before_kib / 1024.0, count * kParamBytes / kMiB,
                  r.rss_before_kib / 1024.0 - count * kParamBytes / kMiB, peak_mib - count * kParamBytes / kMiB,
                  ru_maxrss / 1024.0, r.loaded, count, r.correct, count, 100 * read_cached, 100 * load_cached);
      ok = ok && r.loaded == count && r.correct == count;
    }
  }
  std::printf("\nwarm: the files are in the page cache (just written); cold: after posix_fadvise(DONTNEED) on\n"
              "every file, which drops clean cached pages where the kernel allows. read = plain read() of every\n"
              "file through one 64 MiB buffer. overhead = peak RSS during the load - RSS before it (module built).\n"
              "GB = 1e9 bytes.\n");

  if (keep) {
    std::printf("kept %s\n", dir.c_str());
  } else {
    std::error_code ec;
    if (made_dir) {
      fs::remove_all(dir, ec);
    } else {
      fs::remove_all(single, ec);
      fs::remove_all(sharded, ec);
    }
  }
  if (!ok) {
    std::fprintf(stderr, "bench_checkpoint: the loaded state does not match the saved one\n");
    return 1;
  }
  return 0;
}
