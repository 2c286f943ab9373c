// One training step of the example trainer's GPT (examples/trainer/gpt.h):
// LoRA (r 16, alpha 32) on every projection, or full fine-tuning of the same
// model, AdamW, random tokens. Prints tokens/s and peak memory; with --csv one
// machine-readable line (bench/compare_hf_peft.py runs it beside PEFT).
//
//   bench_train_step --size default --mode lora --device cuda --dtype bfloat16
//   bench_train_step --size tiny --steps 2        # a smoke test, any machine
//
// Sizes: tiny (d 32, 1 layer); default (the trainer's default model: vocab 26,
// d 128, 2 layers, 4 heads, d_ff 256, batch 64 x 16 tokens); mid (vocab 1024,
// d 1024, 4 layers, 16 heads, d_ff 4096, 512 tokens a step); large (vocab
// 32000, d 2048, 16 layers, 16 heads, d_ff 8192, 2048 tokens a step).
// Peak memory: on CUDA the caching allocator's peak allocated bytes over the
// timed steps (weights included); on the CPU the process's peak RSS above its
// RSS before the model was built (weights included, the program's own code not).
#include "gpt.h"

#include <d9d/peft.h>

#include <torch/nn/functional/loss.h>
#include <torch/optim/adamw.h>

#ifdef D9D_BENCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace {

struct Size {
  trainer::GptConfig gpt;
  int64_t batch;
  int64_t tokens;  // per sequence
};

Size size_named(const std::string& name) {
  Size s{};
  if (name == "tiny") {
    s.gpt = {26, 17, 32, 1, 2, 64};
    s.batch = 4;
    s.tokens = 16;
  } else if (name == "default") {
    s.gpt = {26, 17, 128, 2, 4, 256};
    s.batch = 64;
    s.tokens = 16;
  } else if (name == "mid") {
    s.gpt = {1024, 512, 1024, 4, 16, 4096};
    s.batch = 1;
    s.tokens = 512;
  } else if (name == "large") {
    s.gpt = {32000, 2048, 2048, 16, 16, 8192};
    s.batch = 1;
    s.tokens = 2048;
  } else {
    throw std::invalid_argument("--size: expected tiny, default, mid or large, got '" + name + "'");
  }
  return s;
}

void synchronize(const torch::Device& device) {
#ifdef D9D_BENCH_CUDA
  if (device.is_cuda()) c10::cuda::device_synchronize();
#else
  (void)device;
#endif
}

void reset_peak(const torch::Device& device) {
#ifdef D9D_BENCH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.has_index() ? device.index() : 0);
#else
  (void)device;
#endif
}

/// Resident bytes now (/proc/self/statm), 0 where that is not readable.
uint64_t current_rss_bytes() {
  unsigned long long size = 0, resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%llu %llu", &size, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return static_cast<uint64_t>(resident) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

uint64_t peak_bytes(const torch::Device& device, uint64_t rss_baseline) {
#ifdef D9D_BENCH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.has_index() ? device.index() : 0);
    return static_cast<uint64_t>(stats.allocated_bytes[0].peak);
  }
#endif
  (void)device;
  // VmHWM, this process image's peak RSS. Not getrusage's ru_maxrss: Linux
  // carries a parent's peak across fork and exec, so a benchmark started by a
  // large process (a Python driver) would report the parent's.
  uint64_t peak = 0;
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    unsigned long long kib = 0;
    while (std::fgets(line, sizeof line, f)) {
      if (std::sscanf(line, "VmHWM: %llu kB", &kib) == 1) peak = static_cast<uint64_t>(kib) * 1024;
    }
    std::fclose(f);
  }
  return peak > rss_baseline ? peak - rss_baseline : 0;
}

[[noreturn]] void usage(const char* error) {
  std::fprintf(stderr,
               "%s\nusage: bench_train_step [--size tiny|default|mid|large] [--mode lora|full] [--device cpu|cuda]\n"
               "                        [--dtype float32|bfloat16] [--steps N] [--warmup N] [--csv]\n",
               error);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  std::string size_name = "default", mode = "lora", device_name = "cpu", dtype_name = "float32";
  int64_t steps = 20, warmup = 3;
  bool csv = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + arg).c_str());
      return argv[++i];
    };
    if (arg == "--size") size_name = value();
    else if (arg == "--mode") mode = value();
    else if (arg == "--device") device_name = value();
    else if (arg == "--dtype") dtype_name = value();
    else if (arg == "--steps") steps = std::stoll(value());
    else if (arg == "--warmup") warmup = std::stoll(value());
    else if (arg == "--csv") csv = true;
    else usage(("unknown argument " + arg).c_str());
  }
  if (mode != "lora" && mode != "full") usage("--mode: expected lora or full");
  if (dtype_name != "float32" && dtype_name != "bfloat16") usage("--dtype: expected float32 or bfloat16");
  if (steps < 1 || warmup < 0) usage("--steps must be >= 1 and --warmup >= 0");
  const Size size = size_named(size_name);
  const torch::Device device(device_name);
  const auto dtype = dtype_name == "bfloat16" ? at::kBFloat16 : at::kFloat;

  const uint64_t rss_baseline = current_rss_bytes();
  torch::manual_seed(0);
  trainer::Gpt model(size.gpt);
  std::vector<at::Tensor> trainable;
  if (mode == "lora") {
    d9d::peft::LoRA lora({R"(.*_proj)", d9d::peft::LoRAParameters().r(16).alpha(32)});
    d9d::peft::inject_peft_and_freeze(lora, model);
  }
  model->to(device, dtype);
  model->train();
  for (const auto& p : model->parameters()) {
    if (p.requires_grad()) trainable.push_back(p);
  }
  int64_t trainable_count = 0, total_count = 0;
  for (const auto& p : model->parameters()) {
    total_count += p.numel();
    if (p.requires_grad()) trainable_count += p.numel();
  }
  torch::optim::AdamW optimizer(trainable, torch::optim::AdamWOptions(1e-4).weight_decay(0.0));

  const auto ids = torch::randint(0, size.gpt.vocab, {size.batch, size.tokens + 1},
                                  at::TensorOptions().dtype(at::kLong).device(device));
  const auto inputs = ids.slice(1, 0, size.tokens), targets = ids.slice(1, 1).reshape({-1});
  auto step = [&] {
    optimizer.zero_grad();
    const auto logits = model->forward(inputs);
    torch::nn::functional::cross_entropy(logits.reshape({-1, size.gpt.vocab}), targets).backward();
    optimizer.step();
  };

  for (int64_t i = 0; i < warmup; ++i) step();
  synchronize(device);
  reset_peak(device);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < steps; ++i) step();
  synchronize(device);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const int64_t tokens_per_step = size.batch * size.tokens;
  const double tokens_per_s = static_cast<double>(tokens_per_step * steps) / seconds;
  const uint64_t peak = peak_bytes(device, rss_baseline);

  if (csv) {
    std::printf("mode,size,device,dtype,tokens_per_step,steps,seconds,tokens_per_s,peak_bytes,trainable,total\n");
    std::printf("%s,%s,%s,%s,%lld,%lld,%.6f,%.1f,%llu,%lld,%lld\n", mode.c_str(), size_name.c_str(),
                device_name.c_str(), dtype_name.c_str(), static_cast<long long>(tokens_per_step),
                static_cast<long long>(steps), seconds, tokens_per_s, static_cast<unsigned long long>(peak),
                static_cast<long long>(trainable_count), static_cast<long long>(total_count));
  } else {
    std::printf("%s step, %s model (%lld of %lld parameters trained), %s %s: %lld tokens a step\n", mode.c_str(),
                size_name.c_str(), static_cast<long long>(trainable_count), static_cast<long long>(total_count),
                device_name.c_str(), dtype_name.c_str(), static_cast<long long>(tokens_per_step));
    std::printf("  %lld steps in %.3f s: %.0f tokens/s, %.2f ms a step; peak memory %.1f MiB (%s)\n",
                static_cast<long long>(steps), seconds, tokens_per_s, 1e3 * seconds / static_cast<double>(steps),
                static_cast<double>(peak) / (1024.0 * 1024.0),
                device.is_cuda() ? "CUDA allocator peak" : "process peak RSS above the start");
  }
  return 0;
}
