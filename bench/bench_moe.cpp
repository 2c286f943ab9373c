// One mixture-of-experts layer on the CPU, fp32: the plain grouped experts
// against the same experts with LoRA on every expert projection, forward
// (no grad) and forward + backward, with each step's peak allocated memory.
// bench/compare_moe_peft.py runs it next to Hugging Face PEFT's
// `target_parameters` LoRA on the Python twin (tests/peft_reference/moe_twin.py)
// and prints one table.
//
//   ./build-torch2/bench/bench_moe                      # table: E 8 and 64, d 1024, ff 512, 2048 tokens
//   ./build-torch2/bench/bench_moe --csv --threads 2    # for bench/compare_moe_peft.py
//
// The layer: SwiGLU experts (gate, up: d -> ff; down: ff -> d) as three
// d9d::nn::GroupedLinear, top-2 routing of every token. The routing is fixed,
// not learned: token t goes to the experts and weights `moe_routing` draws
// from splitmix64(t), the recipe compare_moe_peft.py repeats in Python, so
// both sides send the same tokens to the same experts (each side prints the
// token count per expert; the script checks they agree). Inside the timed
// step: sort the (token, slot) pairs by expert, gather, experts, weight,
// index_add back, as a MoE block does in every forward.
//
// LoRA: r 16, alpha 32 on gate_proj, up_proj, down_proj of every expert,
// injected with d9d::peft::inject_peft_and_freeze (base frozen), lora_B
// small random so the low-rank products are not all zeros. Forward +
// backward: the input requires grad (the layer sits inside a network), loss
// mean(y^2), gradients set to none before each step as an optimizer's
// zero_grad does; the plain layer's weights are frozen, so its backward is
// the input gradient alone.
//
// Time: median of --trials trials of about --trial-s seconds of back-to-back
// steps, plain and LoRA alternating. Memory: the peak, over one step, of the
// bytes held through LibTorch's CPU allocator above what was held when the
// step began (weights and input excluded; activations, temporaries and
// gradients included). It is read from the allocator's own accounting
// (c10::ProfiledCPUMemoryReporter, the hook behind torch.profiler's
// profile_memory), which compare_moe_peft.py reads on the Python side too.

#include "step_timing.h"

#include <d9d/nn/grouped_linear.h>
#include <d9d/peft.h>

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

struct Shape {
  int64_t tokens = 2048, d = 1024, ff = 512, rank = 16;
};
constexpr int64_t kTopK = 2;

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

/// Fixed top-2 routing: token t's two distinct experts and their weights
/// (summing to 1, exact in float32), from splitmix64(t).
std::pair<at::Tensor, at::Tensor> moe_routing(int64_t tokens, int64_t experts) {
  at::Tensor index = at::empty({tokens, kTopK}, at::TensorOptions().dtype(at::kLong));
  at::Tensor weight = at::empty({tokens, kTopK});
  auto* idx = index.data_ptr<int64_t>();
  auto* w = weight.data_ptr<float>();
  const auto e = static_cast<uint64_t>(experts);
  for (int64_t t = 0; t < tokens; ++t) {
    const uint64_t h = splitmix64(static_cast<uint64_t>(t));
    const uint64_t first = h % e;
    const uint64_t second = e > 1 ? (first + 1 + (h >> 32) % (e - 1)) % e : first;
    idx[2 * t] = static_cast<int64_t>(first);
    idx[2 * t + 1] = static_cast<int64_t>(second);
    w[2 * t] = 0.5F + static_cast<float>((h >> 11) & 0xFFFF) / 131072.0F;
    w[2 * t + 1] = 1.0F - w[2 * t];
  }
  return {index, weight};
}

struct ExpertsImpl : torch::nn::Module {
  ExpertsImpl(int64_t experts, int64_t d, int64_t ff)
      : gate_proj(register_module("gate_proj", d9d::nn::GroupedLinear(experts, d, ff))),
        up_proj(register_module("up_proj", d9d::nn::GroupedLinear(experts, d, ff))),
        down_proj(register_module("down_proj", d9d::nn::GroupedLinear(experts, ff, d))) {}
  at::Tensor forward(const at::Tensor& x, const at::Tensor& counts) {
    return down_proj(torch::silu(gate_proj(x, counts)) * up_proj(x, counts), counts);
  }
  d9d::nn::GroupedLinear gate_proj, up_proj, down_proj;
};
TORCH_MODULE(Experts);

/// The MoE layer given its routing: dispatch, experts, weighted combine.
at::Tensor moe_forward(Experts& experts, const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight,
                       int64_t n_experts) {
  const at::Tensor flat = index.reshape({-1});
  const at::Tensor order = std::get<1>(flat.sort(c10::optional<bool>(true), /*dim=*/0));
  const at::Tensor token = order.div(kTopK, "floor");
  const at::Tensor counts = at::bincount(flat, {}, n_experts);
  const at::Tensor slot_weight = weight.reshape({-1}).index_select(0, order).unsqueeze(1);
  const at::Tensor y = experts->forward(x.index_select(0, token), counts) * slot_weight;
  return at::zeros_like(x).index_add(0, token, y);
}

/// Peak bytes held through the CPU allocator while it is alive, above the
/// level at its first report. The third parameter's type of
/// reportMemoryUsage changed (int64_t in LibTorch 1.13, size_t in 2.x).
template <typename T>
struct TotalArg;
template <typename C, typename R, typename A0, typename A1, typename A2, typename A3, typename A4>
struct TotalArg<R (C::*)(A0, A1, A2, A3, A4)> {
  using type = A2;
};
using Total = TotalArg<decltype(&c10::MemoryReportingInfoBase::reportMemoryUsage)>::type;

class PeakMemory : public c10::MemoryReportingInfoBase {
 public:
  void reportMemoryUsage(void*, int64_t alloc_size, Total total_allocated, Total, c10::Device device) override {
    if (device.type() != c10::DeviceType::CPU) return;
    const auto total = static_cast<int64_t>(total_allocated);
    if (!started_) {
      base_ = total - alloc_size;
      started_ = true;
    }
    peak_ = std::max(peak_, total - base_);
  }
  bool memoryProfilingEnabled() const override { return true; }
  int64_t peak() const { return peak_; }

 private:
  bool started_ = false;
  int64_t base_ = 0, peak_ = 0;
};

int64_t peak_bytes(const std::function<void()>& step) {
  auto peak = std::make_shared<PeakMemory>();
  {
    c10::DebugInfoGuard guard(c10::DebugInfoKind::PROFILER_STATE, peak);
    step();
  }
  return peak->peak();
}

struct Row {
  int64_t experts;
  std::string mode, variant;
  double ms;
  int64_t peak;
};

std::vector<Row> measure(int64_t n_experts, const Shape& s, int trials, double trial_s, std::string& counts_out) {
  torch::manual_seed(0);
  Experts plain(n_experts, s.d, s.ff);
  Experts adapted(n_experts, s.d, s.ff);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : plain->parameters()) p.requires_grad_(false);
    adapted->gate_proj->weight.copy_(plain->gate_proj->weight);
    adapted->up_proj->weight.copy_(plain->up_proj->weight);
    adapted->down_proj->weight.copy_(plain->down_proj->weight);
  }
  d9d::peft::LoRA lora({"(gate|up|down)_proj", d9d::peft::LoRAParameters().r(s.rank).alpha(2.0 * s.rank)});
  d9d::peft::inject_peft_and_freeze(lora, *adapted);
  {
    torch::NoGradGuard no_grad;
    for (const auto& item : adapted->named_parameters()) {
      if (item.key().find("lora_B") != std::string::npos) item.value().normal_(0.0, 0.01);
    }
  }
  const auto routing = moe_routing(s.tokens, n_experts);
  const at::Tensor& index = routing.first;
  const at::Tensor& weight = routing.second;
  const at::Tensor counts = at::bincount(index.reshape({-1}), {}, n_experts);
  std::ostringstream list;
  for (int64_t e = 0; e < n_experts; ++e) list << (e ? ";" : "") << counts[e].item<int64_t>();
  counts_out = list.str();

  const at::Tensor x = at::randn({s.tokens, s.d});
  const at::Tensor x_grad = x.clone().requires_grad_(true);
  auto forward = [&](Experts& layer) {
    return [&layer, &x, &index, &weight, n_experts] {
      torch::NoGradGuard no_grad;
      const at::Tensor y = moe_forward(layer, x, index, weight, n_experts);
      (void)y;
    };
  };
  auto forward_backward = [&](Experts& layer) {
    return [&layer, &x_grad, &index, &weight, n_experts] {
      for (auto& p : layer->parameters()) p.mutable_grad() = at::Tensor();
      x_grad.mutable_grad() = at::Tensor();
      const at::Tensor y = moe_forward(layer, x_grad, index, weight, n_experts);
      y.square().mean().backward();
    };
  };
  std::vector<Row> rows;
  for (const std::string mode : {"fwd", "fwdbwd"}) {
    const std::vector<std::function<void()>> steps =
        mode == "fwd" ? std::vector<std::function<void()>>{forward(plain), forward(adapted)}
                      : std::vector<std::function<void()>>{forward_backward(plain), forward_backward(adapted)};
    const auto ms = d9d_bench::time_alternating(steps, trials, trial_s);
    rows.push_back({n_experts, mode, "plain", ms[0], peak_bytes(steps[0])});
    rows.push_back({n_experts, mode, "lora", ms[1], peak_bytes(steps[1])});
  }
  return rows;
}

std::vector<int64_t> parse_list(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(std::stoll(item));
  return out;
}

[[noreturn]] void usage(const std::string& error) {
  std::fprintf(stderr,
               "%s\nusage: bench_moe [--csv] [--experts 8,64] [--tokens 2048] [--d 1024] [--ff 512] [--rank 16] "
               "[--threads N] [--trials 5] [--trial-s 0.5]\n",
               error.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  bool csv = false;
  int trials = 5;
  double trial_s = 0.5;
  Shape shape;
  std::vector<int64_t> experts = {8, 64};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value after " + arg);
      return argv[++i];
    };
    if (arg == "--csv") csv = true;
    else if (arg == "--experts") experts = parse_list(value());
    else if (arg == "--tokens") shape.tokens = std::stoll(value());
    else if (arg == "--d") shape.d = std::stoll(value());
    else if (arg == "--ff") shape.ff = std::stoll(value());
    else if (arg == "--rank") shape.rank = std::stoll(value());
    else if (arg == "--threads") at::set_num_threads(std::stoi(value()));
    else if (arg == "--trials") trials = std::stoi(value());
    else if (arg == "--trial-s") trial_s = std::stod(value());
    else usage("unknown argument " + arg);
  }
  if (trials < 1) usage("--trials must be >= 1");
  for (const int64_t e : experts) {
    if (e < 2) usage("--experts: top-2 routing needs at least 2 experts, got " + std::to_string(e));
  }
  std::vector<Row> rows;
  for (const int64_t e : experts) {
    std::string counts;
    const auto measured = measure(e, shape, trials, trial_s, counts);
    if (csv) std::printf("counts,%lld,%s\n", static_cast<long long>(e), counts.c_str());
    rows.insert(rows.end(), measured.begin(), measured.end());
  }
  if (csv) {
    for (const auto& r : rows) {
      std::printf("time,%lld,%s,%s,%.3f,%lld\n", static_cast<long long>(r.experts), r.mode.c_str(), r.variant.c_str(),
                  r.ms, static_cast<long long>(r.peak));
    }
    return 0;
  }
  std::printf("bench_moe: d %lld, ff %lld, %lld tokens, top-2, r %lld, fp32, %d threads\n\n",
              static_cast<long long>(shape.d), static_cast<long long>(shape.ff), static_cast<long long>(shape.tokens),
              static_cast<long long>(shape.rank), at::get_num_threads());
  std::printf("| E | step | plain ms | LoRA ms | LoRA / plain | plain peak MiB | LoRA peak MiB |\n");
  std::printf("|---:|---|---:|---:|---:|---:|---:|\n");
  for (size_t i = 0; i + 1 < rows.size(); i += 2) {
    const Row& p = rows[i];
    const Row& l = rows[i + 1];
    std::printf("| %lld | %s | %.2f | %.2f | %.3fx | %.1f | %.1f |\n", static_cast<long long>(p.experts),
                p.mode == "fwd" ? "forward" : "forward+backward", p.ms, l.ms, l.ms / p.ms,
                static_cast<double>(p.peak) / 1048576.0, static_cast<double>(l.peak) / 1048576.0);
  }
  return 0;
}
