// CPU benchmarks: a LoRA linear against the plain linear layer, fp32.
//
// Every LoRA benchmark has a plain-layer twin measured in the same process
// just before it, and the run ends with a table of ratios LoRA / plain: the
// ratios are what the targets in docs/performance.md are stated in.
//
//   ./build/bench/bench_lora                      # whole suite (1-2 min on 2 cores)
//   ./build/bench/bench_lora --quick              # only in=out=1024, 512 tokens, r=16
//   ./build/bench/bench_lora --benchmark_filter='d=1024/t=512'
//   ./build/bench/bench_lora --benchmark_repetitions=5   # default 3; ratios of medians
//   ./build/bench/bench_lora --benchmark_enable_random_interleaving=true  # busy machine
//
// Names: <Variant>/<What>/d=<in=out>/t=<tokens>[/r=<rank>]; merges have no t.

#include <d9d/nn/linear.h>
#include <d9d/peft/lora/layer.h>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/modules/linear.h>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include <unistd.h>

namespace {

struct Shape {
  int64_t d;       // in = out features
  int64_t tokens;  // rows of the input
};

// The target shape; --quick runs only this.
constexpr Shape kTargetShape{1024, 512};
constexpr int64_t kTargetRank = 16;

std::string shape_name(int64_t d, int64_t tokens) {
  return "d=" + std::to_string(d) + "/t=" + std::to_string(tokens);
}
std::string rank_name(int64_t r) { return "r=" + std::to_string(r); }

struct Grid {
  std::vector<int64_t> dims;  // in = out
  std::vector<int64_t> token_counts;
  std::vector<int64_t> ranks;
};

Grid make_grid(bool quick) {
  if (quick) return {{kTargetShape.d}, {kTargetShape.tokens}, {kTargetRank}};
  return {{1024, 4096}, {16, 512}, {8, 16, 64}};
}

torch::nn::Linear frozen_plain(int64_t d) {
  torch::nn::Linear layer(torch::nn::LinearOptions(d, d).bias(false));
  layer->weight.requires_grad_(false);
  return layer;
}

// A LoRA wrapper as inject_peft_and_freeze leaves it: base frozen, adapters
// trainable. lora_B gets small random values so the low-rank path is not an
// all-zero product the BLAS could race through.
d9d::peft::LoRALinear lora_layer(int64_t d, int64_t r, double dropout) {
  d9d::nn::Linear base(torch::nn::LinearOptions(d, d).bias(false));
  base->weight.requires_grad_(false);
  d9d::peft::LoRALinear lora(base.ptr(), d9d::peft::LoRAParameters().r(r).alpha(2.0 * r).dropout(dropout));
  torch::NoGradGuard no_grad;
  lora->lora_B->weight.normal_(0.0, 1e-3);
  return lora;
}

// ---------------------------------------------------------------- forward

void plain_forward(benchmark::State& state, Shape s) {
  auto layer = frozen_plain(s.d);
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({s.tokens, s.d});
  for (auto _ : state) {
    auto y = layer->forward(x);
    benchmark::DoNotOptimize(y.data_ptr());
  }
}

void lora_forward(benchmark::State& state, Shape s, int64_t r, double dropout) {
  auto lora = lora_layer(s.d, r, dropout);
  if (dropout > 0.0) {
    lora->train();
  } else {
    lora->eval();
  }
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({s.tokens, s.d});
  for (auto _ : state) {
    auto y = lora->forward(x);
    benchmark::DoNotOptimize(y.data_ptr());
  }
}

// ------------------------------------------------------- forward+backward
// The base stays frozen (as in LoRA training) and the input requires grad, so
// both sides compute the input gradient through W; LoRA adds the adapters'
// weight gradients. Gradients are reset to undefined every step, like
// optimizer.zero_grad(set_to_none=true).

void plain_forward_backward(benchmark::State& state, Shape s) {
  auto layer = frozen_plain(s.d);
  auto x = torch::randn({s.tokens, s.d}).requires_grad_(true);
  for (auto _ : state) {
    layer->forward(x).sum().backward();
    benchmark::DoNotOptimize(x.grad().data_ptr());
    x.mutable_grad() = at::Tensor();
  }
}

void lora_forward_backward(benchmark::State& state, Shape s, int64_t r) {
  auto lora = lora_layer(s.d, r, 0.0);
  lora->train();
  auto x = torch::randn({s.tokens, s.d}).requires_grad_(true);
  for (auto _ : state) {
    lora->forward(x).sum().backward();
    benchmark::DoNotOptimize(x.grad().data_ptr());
    x.mutable_grad() = at::Tensor();
    lora->lora_A->weight.mutable_grad() = at::Tensor();
    lora->lora_B->weight.mutable_grad() = at::Tensor();
  }
}

// ------------------------------------------------------------------ merge
// W += scale * B @ A on a d x d weight and back (merge_adapter then
// unmerge_adapter), against the same two in-place addmm_ calls.

void lora_merge(benchmark::State& state, int64_t d, int64_t r) {
  auto lora = lora_layer(d, r, 0.0);
  for (auto _ : state) {
    lora->merge_adapter("default");
    lora->unmerge_adapter("default");
    benchmark::ClobberMemory();
  }
}

void addmm_merge(benchmark::State& state, int64_t d, int64_t r) {
  torch::NoGradGuard no_grad;
  auto w = torch::randn({d, d});
  const auto b = torch::randn({d, r}) * 1e-3;
  const auto a = torch::randn({r, d});
  const double scale = 2.0;
  for (auto _ : state) {
    w.addmm_(b, a, /*beta=*/1.0, /*alpha=*/scale);
    w.addmm_(b, a, /*beta=*/1.0, /*alpha=*/-scale);
    benchmark::ClobberMemory();
  }
}

void naive_merge(benchmark::State& state, int64_t d, int64_t r) {
  torch::NoGradGuard no_grad;
  auto w = torch::randn({d, d});
  const auto b = torch::randn({d, r}) * 1e-3;
  const auto a = torch::randn({r, d});
  const double scale = 2.0;
  for (auto _ : state) {
    w += scale * b.mm(a);
    w -= scale * b.mm(a);
    benchmark::ClobberMemory();
  }
}

// ----------------------------------------------------------- registration

void set_common(benchmark::internal::Benchmark* b, double min_time) {
  // Process CPU time counts OpenBLAS's worker threads too: on a shared box it is
  // a second opinion on ratios that real time alone can get wrong.
  b->Unit(benchmark::kMicrosecond)->UseRealTime()->MeasureProcessCPUTime()->MinTime(min_time);
}

// Pairs are registered next to each other (plain, then its LoRA variants) so
// that both sides of a ratio see the same machine state.
void register_all(const Grid& grid) {
  const auto& [dims, token_counts, ranks] = grid;
  // The target shape is timed longer: its ratios are the ones with a bar to pass.
  auto min_time = [](int64_t d, int64_t t) {
    return d == kTargetShape.d && t == kTargetShape.tokens ? 0.3 : 0.05;
  };

  for (int64_t d : dims) {
    for (int64_t t : token_counts) {
      const Shape s{d, t};
      const std::string sn = shape_name(d, t);
      const double mt = min_time(d, t);
      set_common(benchmark::RegisterBenchmark(("Plain/Forward/" + sn).c_str(), plain_forward, s), mt);
      for (int64_t r : ranks) {
        set_common(benchmark::RegisterBenchmark(("LoRA/Forward/" + sn + "/" + rank_name(r)).c_str(), lora_forward, s,
                                                r, 0.0),
                   mt);
      }
      for (int64_t r : ranks) {
        set_common(benchmark::RegisterBenchmark(("LoRA/ForwardDropout/" + sn + "/" + rank_name(r)).c_str(),
                                                lora_forward, s, r, 0.1),
                   mt);
      }
      set_common(benchmark::RegisterBenchmark(("Plain/ForwardBackward/" + sn).c_str(), plain_forward_backward, s), mt);
      for (int64_t r : ranks) {
        set_common(benchmark::RegisterBenchmark(("LoRA/ForwardBackward/" + sn + "/" + rank_name(r)).c_str(),
                                                lora_forward_backward, s, r),
                   mt);
      }
    }
    for (int64_t r : ranks) {
      const std::string mn = "d=" + std::to_string(d) + "/" + rank_name(r);
      set_common(benchmark::RegisterBenchmark(("Plain/AddmmMerge/" + mn).c_str(), addmm_merge, d, r), 0.05);
      set_common(benchmark::RegisterBenchmark(("LoRA/Merge/" + mn).c_str(), lora_merge, d, r), 0.05);
      set_common(benchmark::RegisterBenchmark(("Naive/Merge/" + mn).c_str(), naive_merge, d, r), 0.05);
    }
  }
}

// ------------------------------------------------------------ ratio table

// Prints one line per benchmark (the median when there are repetitions) and
// keeps each benchmark's median real and process CPU time, in microseconds.
class CollectingReporter : public benchmark::ConsoleReporter {
 public:
  explicit CollectingReporter(OutputOptions options) : ConsoleReporter(options) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    std::vector<Run> shown;
    for (const auto& run : runs) {
      if (run.error_occurred) continue;
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      const bool single = run.run_type == Run::RT_Iteration && run.repetitions <= 1;
      if (!median && !single) continue;
      const double to_us = 1e6 / benchmark::GetTimeUnitMultiplier(run.time_unit);
      times_[run.run_name.function_name] = {run.GetAdjustedRealTime() * to_us, run.GetAdjustedCPUTime() * to_us};
      shown.push_back(run);
    }
    if (!shown.empty()) ConsoleReporter::ReportRuns(shown);
  }

  // Negative if the benchmark did not run.
  double us(const std::string& name) const { return find(name).real; }
  double cpu_us(const std::string& name) const { return find(name).cpu; }

 private:
  struct Time {
    double real = -1.0;
    double cpu = -1.0;
  };

  Time find(const std::string& name) const {
    auto it = times_.find(name);
    return it == times_.end() ? Time{} : it->second;
  }

  std::map<std::string, Time> times_;
};

void print_us(double us) {
  if (us < 0) {
    std::printf(" %10s", "-");
  } else {
    std::printf(" %10.1f", us);
  }
}

void print_cell(double lora, double plain) {
  if (lora < 0 || plain <= 0) {
    std::printf(" %7s", "-");
  } else {
    std::printf(" %6.3fx", lora / plain);
  }
}

// One ratio as "real (cpu)": real time is the measure; process CPU time is shown
// beside it because contention on a shared machine inflates real time only.
void print_pair(const CollectingReporter& rep, const std::string& lora, const std::string& plain) {
  print_cell(rep.us(lora), rep.us(plain));
  print_cell(rep.cpu_us(lora), rep.cpu_us(plain));
}

void print_ratios(const CollectingReporter& rep, const Grid& grid) {
  const auto& [dims, token_counts, ranks] = grid;

  std::printf("\nLoRA / plain, median over repetitions; each ratio as real time, then process CPU time.\n");
  std::printf("ForwardDropout is against plain Forward.\n");
  std::printf("%-18s %10s %10s %-16s %-16s %-16s\n", "shape", "plain fwd", "plain f+b", "  Forward", "  ForwardDropout",
              "  ForwardBackward");
  std::printf("%-18s %10s %10s %8s %7s %8s %7s %8s %7s\n", "", "us", "us", "real", "cpu", "real", "cpu", "real", "cpu");
  for (int64_t d : dims) {
    for (int64_t t : token_counts) {
      const std::string sn = shape_name(d, t);
      const std::string pf = "Plain/Forward/" + sn;
      const std::string pfb = "Plain/ForwardBackward/" + sn;
      for (int64_t r : ranks) {
        const std::string suffix = sn + "/" + rank_name(r);
        const std::string lf = "LoRA/Forward/" + suffix;
        const std::string ld = "LoRA/ForwardDropout/" + suffix;
        const std::string lfb = "LoRA/ForwardBackward/" + suffix;
        if (rep.us(lf) < 0 && rep.us(ld) < 0 && rep.us(lfb) < 0) continue;  // filtered out
        std::printf("%-18s", suffix.c_str());
        print_us(rep.us(pf));
        print_us(rep.us(pfb));
        print_pair(rep, lf, pf);
        print_pair(rep, ld, pf);
        print_pair(rep, lfb, pfb);
        std::printf("\n");
      }
    }
  }

  std::printf("\nMerge of a d x d weight (real time; ratios to one in-place W.addmm_(B, A))\n");
  std::printf("%-18s %10s %10s %10s %8s %8s\n", "shape", "addmm_ us", "LoRA us", "naive us", "LoRA", "naive");
  for (int64_t d : dims) {
    for (int64_t r : ranks) {
      const std::string mn = "d=" + std::to_string(d) + "/" + rank_name(r);
      const double pa = rep.us("Plain/AddmmMerge/" + mn);
      const double lm = rep.us("LoRA/Merge/" + mn);
      const double nm = rep.us("Naive/Merge/" + mn);
      if (pa < 0 && lm < 0 && nm < 0) continue;  // filtered out
      std::printf("%-18s", mn.c_str());
      print_us(pa);
      print_us(lm);
      print_us(nm);
      print_cell(lm, pa);
      print_cell(nm, pa);
      std::printf("\n");
    }
  }

  const std::string sn = shape_name(kTargetShape.d, kTargetShape.tokens);
  const std::string tn = sn + "/" + rank_name(kTargetRank);
  const double pf = rep.us("Plain/Forward/" + sn);
  const double lf = rep.us("LoRA/Forward/" + tn);
  const double ld = rep.us("LoRA/ForwardDropout/" + tn);
  if (pf > 0 && lf > 0 && ld > 0) {
    std::printf("\nCPU targets (%s, real time): forward %.3fx (<= 1.10: %s), forward with dropout %.3fx (<= 1.30: %s)\n",
                tn.c_str(), lf / pf, lf / pf <= 1.10 ? "met" : "NOT met", ld / pf, ld / pf <= 1.30 ? "met" : "NOT met");
  }
}

}  // namespace

int main(int argc, char** argv) {
  // --quick is ours; strip it before Google Benchmark parses the rest. Unless
  // told otherwise, run 3 repetitions and compare medians: one-off hiccups on
  // a shared machine then do not decide a ratio.
  bool quick = false;
  bool repetitions_given = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
      continue;
    }
    if (std::strncmp(argv[i], "--benchmark_repetitions", 23) == 0) repetitions_given = true;
    args.push_back(argv[i]);
  }
  char default_repetitions[] = "--benchmark_repetitions=3";
  if (!repetitions_given) args.insert(args.begin() + (args.empty() ? 0 : 1), default_repetitions);
  int args_count = static_cast<int>(args.size());
  benchmark::Initialize(&args_count, args.data());
  if (benchmark::ReportUnrecognizedArguments(args_count, args.data())) return 1;

  std::printf("LibTorch threads: %d\n", at::get_num_threads());
  const Grid grid = make_grid(quick);
  register_all(grid);
  // Colour only on a terminal, as Google Benchmark's own default does.
  CollectingReporter reporter(isatty(fileno(stdout)) ? benchmark::ConsoleReporter::OO_ColorTabular
                                                     : benchmark::ConsoleReporter::OO_Tabular);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  print_ratios(reporter, grid);
  benchmark::Shutdown();
  return 0;
}
