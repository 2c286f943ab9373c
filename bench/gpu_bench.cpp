// GPU benchmark: a LoRA linear against the plain linear layer, timed with CUDA
// events. Built only where LibTorch has CUDA (bench/CMakeLists.txt).
//
//   ./build/bench/gpu_bench            # table
//   ./build/bench/gpu_bench --csv      # kind,dtype,tokens,plain_us,lora_us,ratio
//                                      # (read by bench/compare_hf_peft.py)
//
// in = out = 4096, r = 16, alpha = 32, no dropout; bf16 and fp32 (TF32 off,
// LibTorch's default); tokens 16, 512, 4096, 16384. Each time is the median of
// several trials, plain and LoRA alternating, each trial a run of back-to-back
// calls between two CUDA events: launch overhead counts, as it does for a
// caller. Merge: `merge_adapter()` + `unmerge_adapter()` on the 4096 x 4096 weight against two
// in-place `W.addmm_(B, A)`, each call timed alone after a synchronize,
// median of 50. compare_hf_peft.py measures PEFT the same way.

#include <d9d/nn/linear.h>
#include <d9d/peft/lora/layer.h>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/cuda.h>
#include <torch/nn/modules/linear.h>
#include <torch/utils.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t kDim = 4096;
constexpr int64_t kRank = 16;
constexpr int64_t kAlpha = 32;
constexpr int kTrials = 7;
// Each trial runs long enough for event resolution and launch jitter not to matter.
constexpr double kTrialMs = 50.0;
constexpr int kMergeCalls = 50;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Microseconds per call of `f` over `iters` back-to-back calls on the current stream.
template <class F>
double time_once_us(F& f, int iters) {
  at::cuda::CUDAEvent start(cudaEventDefault);
  at::cuda::CUDAEvent stop(cudaEventDefault);
  start.record();
  for (int i = 0; i < iters; ++i) f();
  stop.record();
  stop.synchronize();
  return static_cast<double>(start.elapsed_time(stop)) * 1000.0 / iters;
}

// Enough iterations for one trial to last about kTrialMs.
template <class F>
int calibrate(F& f) {
  for (int i = 0; i < 3; ++i) f();  // warm-up: cuBLAS handles, workspaces, allocator
  torch::cuda::synchronize();
  const double us = time_once_us(f, 5);
  return static_cast<int>(std::clamp(kTrialMs * 1000.0 / std::max(us, 1.0), 5.0, 20000.0));
}

struct Pair {
  double plain_us;
  double lora_us;
};

// Alternates the two sides trial by trial so clock and thermal drift hit both.
template <class P, class L>
Pair time_pair(P plain, L lora) {
  const int plain_iters = calibrate(plain);
  const int lora_iters = calibrate(lora);
  std::vector<double> p;
  std::vector<double> l;
  for (int t = 0; t < kTrials; ++t) {
    p.push_back(time_once_us(plain, plain_iters));
    l.push_back(time_once_us(lora, lora_iters));
  }
  return {median(p), median(l)};
}

// Median of single calls, each alone between two events after a synchronize:
// what one merge costs a caller. Plain and LoRA alternate call by call.
template <class P, class L>
Pair time_single_calls(P plain, L lora, int calls) {
  at::cuda::CUDAEvent start(cudaEventDefault);
  at::cuda::CUDAEvent stop(cudaEventDefault);
  auto once = [&](auto& f) {
    torch::cuda::synchronize();
    start.record();
    f();
    stop.record();
    stop.synchronize();
    return static_cast<double>(start.elapsed_time(stop)) * 1000.0;
  };
  std::vector<double> p;
  std::vector<double> l;
  for (int i = 0; i < calls + 3; ++i) {
    const double tp = once(plain);
    const double tl = once(lora);
    if (i < 3) continue;  // warm-up
    p.push_back(tp);
    l.push_back(tl);
  }
  return {median(p), median(l)};
}

// A LoRA wrapper as inject_peft_and_freeze leaves it (base frozen, adapters
// trainable), with a non-zero lora_B so the low-rank path does real work.
d9d::peft::LoRALinear make_lora(torch::ScalarType dtype) {
  d9d::nn::Linear base(torch::nn::LinearOptions(kDim, kDim).bias(false));
  base->to(torch::kCUDA, dtype);
  base->weight.requires_grad_(false);
  d9d::peft::LoRALinear lora(base.ptr(), d9d::peft::LoRAParameters().r(kRank).alpha(kAlpha));
  torch::NoGradGuard no_grad;
  lora->lora_B->weight.normal_(0.0, 1e-3);
  return lora;
}

torch::nn::Linear make_plain(torch::ScalarType dtype) {
  torch::nn::Linear plain(torch::nn::LinearOptions(kDim, kDim).bias(false));
  plain->to(torch::kCUDA, dtype);
  plain->weight.requires_grad_(false);
  return plain;
}

struct Row {
  std::string kind;  // forward, forward_backward, merge
  std::string dtype;
  int64_t tokens;  // 0 for merge
  Pair t;
};

void bench_dtype(torch::ScalarType dtype, const std::string& dtype_name, const std::vector<int64_t>& token_counts,
                 std::vector<Row>& rows) {
  const auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(dtype);
  auto plain = make_plain(dtype);
  auto lora = make_lora(dtype);

  for (int64_t tokens : token_counts) {
    {
      torch::NoGradGuard no_grad;
      lora->eval();
      const auto x = torch::randn({tokens, kDim}, opts);
      auto p = [&] { (void)plain->forward(x); };
      auto l = [&] { (void)lora->forward(x); };
      rows.push_back({"forward", dtype_name, tokens, time_pair(p, l)});
    }
    {
      // Base frozen and input requiring grad on both sides: both compute the
      // input gradient through W; LoRA adds the adapters' weight gradients.
      lora->train();
      auto x = torch::randn({tokens, kDim}, opts).requires_grad_(true);
      auto p = [&] {
        plain->forward(x).sum().backward();
        x.mutable_grad() = at::Tensor();
      };
      auto l = [&] {
        lora->forward(x).sum().backward();
        x.mutable_grad() = at::Tensor();
        lora->lora_A->weight.mutable_grad() = at::Tensor();
        lora->lora_B->weight.mutable_grad() = at::Tensor();
      };
      rows.push_back({"forward_backward", dtype_name, tokens, time_pair(p, l)});
    }
  }

  {
    torch::NoGradGuard no_grad;
    auto w = torch::randn({kDim, kDim}, opts);
    const auto b = torch::randn({kDim, kRank}, opts) * 1e-3;
    const auto a = torch::randn({kRank, kDim}, opts);
    const double scale = static_cast<double>(kAlpha) / kRank;
    auto p = [&] {
      w.addmm_(b, a, /*beta=*/1.0, /*alpha=*/scale);
      w.addmm_(b, a, /*beta=*/1.0, /*alpha=*/-scale);
    };
    auto l = [&] {
      lora->merge_adapter("default");
      lora->unmerge_adapter("default");
    };
    rows.push_back({"merge", dtype_name, 0, time_single_calls(p, l, kMergeCalls)});
  }
}

void print_table(const std::vector<Row>& rows) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  std::printf("GPU: %s, LibTorch %s; in = out = %lld, r = %lld, alpha = %lld\n", props->name, TORCH_VERSION,
              static_cast<long long>(kDim), static_cast<long long>(kRank), static_cast<long long>(kAlpha));
  std::printf("Median of %d trials (merge: of %d single calls); LoRA / plain (merge: merge_adapter + unmerge_adapter / two W.addmm_)\n\n",
              kTrials, kMergeCalls);
  std::printf("%-17s %-6s %7s %12s %12s %8s\n", "what", "dtype", "tokens", "plain us", "LoRA us", "ratio");
  for (const auto& r : rows) {
    std::printf("%-17s %-6s %7lld %12.1f %12.1f %7.3fx\n", r.kind.c_str(), r.dtype.c_str(),
                static_cast<long long>(r.tokens), r.t.plain_us, r.t.lora_us, r.t.lora_us / r.t.plain_us);
  }
  for (const auto& r : rows) {
    if (r.dtype != "bf16") continue;
    if (r.kind == "forward" && r.tokens == 4096) {
      std::printf("\ntarget bf16 forward @4096 tokens <= 1.20x: %.3fx (%s)\n", r.t.lora_us / r.t.plain_us,
                  r.t.lora_us / r.t.plain_us <= 1.20 ? "met" : "NOT met");
    }
    if (r.kind == "forward" && r.tokens == 16) {
      std::printf("target bf16 forward @16 tokens <= 1.8x: %.3fx (%s)\n", r.t.lora_us / r.t.plain_us,
                  r.t.lora_us / r.t.plain_us <= 1.8 ? "met" : "NOT met");
    }
    if (r.kind == "merge") {
      std::printf("target bf16 merge <= 22 us: %.1f us (%s)\n", r.t.lora_us, r.t.lora_us <= 22.0 ? "met" : "NOT met");
    }
  }
}

void print_csv(const std::vector<Row>& rows) {
  std::printf("kind,dtype,tokens,plain_us,lora_us,ratio\n");
  for (const auto& r : rows) {
    std::printf("%s,%s,%lld,%.3f,%.3f,%.4f\n", r.kind.c_str(), r.dtype.c_str(), static_cast<long long>(r.tokens),
                r.t.plain_us, r.t.lora_us, r.t.lora_us / r.t.plain_us);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool csv = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--csv") == 0) {
      csv = true;
    } else {
      std::fprintf(stderr, "usage: %s [--csv]\n", argv[0]);
      return std::strcmp(argv[i], "--help") == 0 ? 0 : 2;
    }
  }
  if (!torch::cuda::is_available()) {
    std::printf("gpu_bench: no CUDA device visible to LibTorch; nothing to measure.\n");
    return 0;
  }
  torch::manual_seed(0);
  const std::vector<int64_t> token_counts{16, 512, 4096, 16384};
  std::vector<Row> rows;
  bench_dtype(torch::kBFloat16, "bf16", token_counts, rows);
  bench_dtype(torch::kFloat32, "fp32", token_counts, rows);
  if (csv) {
    print_csv(rows);
  } else {
    print_table(rows);
  }
  return 0;
}
