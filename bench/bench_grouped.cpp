// CPU benchmarks of d9d::nn::GroupedLinear (the experts of a MoE block), fp32:
// the layer's per-group products against padding every group to the largest
// and one bmm (the alternative it was chosen over), with even and skewed
// routing, and a LoRA-wrapped layer against its base.
//
//   ./build/bench/bench_grouped
//   ./build/bench/bench_grouped --benchmark_filter='G=64'
//
// Names: <What>/G=<groups>/<even|skewed>; d = 1024, f = 512, 2048 tokens.

#include <d9d/nn/grouped_linear.h>
#include <d9d/peft/lora/grouped_linear.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <string>
#include <vector>

namespace {

constexpr int64_t kIn = 1024, kOut = 512, kTokens = 2048;

/// Token counts per group: multinomial over the groups, or with group 0 as likely as all others together.
std::vector<int64_t> routing(int64_t groups, bool skewed) {
  at::Tensor probs = at::ones({groups});
  if (skewed) probs[0] = static_cast<double>(groups);
  const at::Tensor counts = at::bincount(at::multinomial(probs, kTokens, /*replacement=*/true), {}, groups);
  return {counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + groups};
}

at::Tensor pad_bmm(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& sizes) {
  const auto groups = static_cast<int64_t>(sizes.size());
  const int64_t most = *std::max_element(sizes.begin(), sizes.end());
  std::vector<int64_t> slots;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t j = 0; j < sizes[static_cast<size_t>(g)]; ++j) slots.push_back(g * most + j);
  }
  const at::Tensor index = at::tensor(slots, at::TensorOptions().dtype(at::kLong));
  const at::Tensor padded = at::zeros({groups * most, x.size(1)}, x.options()).index_copy(0, index, x);
  return at::bmm(padded.view({groups, most, x.size(1)}), w).view({groups * most, w.size(2)}).index_select(0, index);
}

void run(benchmark::State& state, int64_t groups, bool skewed, const std::string& what) {
  at::manual_seed(0);
  const auto sizes = routing(groups, skewed);
  const at::Tensor counts = at::tensor(sizes, at::TensorOptions().dtype(at::kLong));
  auto layer = std::make_shared<d9d::nn::GroupedLinearImpl>(groups, kIn, kOut);
  std::shared_ptr<d9d::peft::LoRAGroupedLinearImpl> lora;
  if (what == "LoRA") {
    lora = std::make_shared<d9d::peft::LoRAGroupedLinearImpl>(layer, d9d::peft::LoRAParameters().r(16));
    lora->eval();
  }
  const at::Tensor x = at::randn({kTokens, kIn});
  torch::NoGradGuard no_grad;
  for (auto _ : state) {
    at::Tensor y;
    if (what == "PadBmm") y = pad_bmm(x, layer->weight, sizes);
    else if (lora) y = lora->forward(x, counts);
    else y = layer->forward(x, counts);
    benchmark::DoNotOptimize(y.data_ptr());
  }
}

void register_all() {
  for (const std::string what : {"GroupedLinear", "PadBmm", "LoRA"}) {
    for (const int64_t groups : {8, 64}) {
      for (const bool skewed : {false, true}) {
        const std::string name = what + "/G=" + std::to_string(groups) + (skewed ? "/skewed" : "/even");
        benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { run(s, groups, skewed, what); })
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
