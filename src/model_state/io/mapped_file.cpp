#include "mapped_file.h"

#include <d9d/model_state/io/checkpoint_error.h>

#include <fmt/format.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <mutex>

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace d9d::model_state::detail {

namespace {

/// The mappings the handler guards. Fixed-size and lock-free: the handler
/// reads it from any thread, at any point.
struct Slot {
  std::atomic<bool> used{false};
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<uint64_t> faults{0};
};
constexpr size_t kSlots = 4096;
Slot g_slots[kSlots];
uintptr_t g_page = 4096;
struct sigaction g_previous {};
std::once_flag g_install;

void on_sigbus(int sig, siginfo_t* info, void* context) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  for (auto& slot : g_slots) {
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    const uintptr_t end = slot.end.load(std::memory_order_acquire);
    if (begin == 0 || addr < begin || addr >= end) continue;
    // The file ends before this page: zeros from here to the end of the
    // mapping, so one fault covers the whole missing tail.
    const uintptr_t page = addr & ~(g_page - 1);
    void* zeros = ::mmap(reinterpret_cast<void*>(page), end - page, PROT_READ | PROT_WRITE,
                         MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (zeros == MAP_FAILED) break;
    slot.faults.fetch_add(1, std::memory_order_release);
    return;
  }
  // Not a guarded mapping: whatever handled SIGBUS before us.
  if ((g_previous.sa_flags & SA_SIGINFO) && g_previous.sa_sigaction) {
    g_previous.sa_sigaction(sig, info, context);
    return;
  }
  if (!(g_previous.sa_flags & SA_SIGINFO) && g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    g_previous.sa_handler(sig);
    return;
  }
  // The default action: returning re-runs the access, which faults again
  // and ends the process as it would have without us.
  ::signal(SIGBUS, SIG_DFL);
}

void install_handler() {
  g_page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  struct sigaction action {};
  action.sa_sigaction = &on_sigbus;
  action.sa_flags = SA_SIGINFO | SA_RESTART | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGBUS, &action, &g_previous);
}

}  // namespace

MappedFile::MappedFile(int fd, size_t size, const std::string& path) : path_(path), size_(size) {
  std::call_once(g_install, install_handler);
  slot_ = kSlots;
  for (size_t i = 0; i < kSlots; ++i) {
    bool expected = false;
    if (g_slots[i].used.compare_exchange_strong(expected, true)) {
      slot_ = i;
      break;
    }
  }
  if (slot_ == kSlots) {
    throw CheckpointError(fmt::format("{}: cannot map: {} files are mapped already (the most this process guards "
                                      "at once); close some checkpoints first",
                                      path, kSlots));
  }
  void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  if (addr == MAP_FAILED) {
    const std::string why = std::strerror(errno);
    g_slots[slot_].used.store(false);
    throw CheckpointError(fmt::format("{}: cannot map: {}", path, why));
  }
  data_ = static_cast<char*>(addr);
  Slot& slot = g_slots[slot_];
  slot.faults.store(0);
  slot.end.store(reinterpret_cast<uintptr_t>(data_) + size, std::memory_order_release);
  slot.begin.store(reinterpret_cast<uintptr_t>(data_), std::memory_order_release);
}

MappedFile::~MappedFile() {
  Slot& slot = g_slots[slot_];
  slot.begin.store(0, std::memory_order_release);
  slot.end.store(0, std::memory_order_release);
  ::munmap(data_, size_);
  slot.used.store(false, std::memory_order_release);
}

void MappedFile::verify() const {
  if (g_slots[slot_].faults.load(std::memory_order_acquire) == 0) return;
  struct stat st {};
  const std::string now = ::stat(path_.c_str(), &st) == 0 ? fmt::format("{} bytes now", st.st_size) : "gone now";
  throw CheckpointError(fmt::format("{}: the file was truncated or replaced while it was read ({} bytes when opened, "
                                    "{}): what was read from it is not its data. Check the file and run again",
                                    path_, size_, now));
}

}  // namespace d9d::model_state::detail
