// Mixed batches: the same batch with every row on one adapter, and with its
// rows spread over 1, 4 or 16 adapters (MixedBatchScope), fp32, inference.
//
//   ./build/bench/bench_mixed_batch            # table
//   ./build/bench/bench_mixed_batch --csv      # for bench/compare_mixed_batch.py
//
// Two cases, each with LoRA r 16, alpha 32, different random weights per
// adapter:
//   linear  one LoRA linear 4096 x 4096 (no bias), 512 rows
//   gpt     the example trainer's GPT at its default size (examples/trainer),
//           LoRA on every projection, 64 sequences of 16 tokens
// Row i uses adapter i mod N. Each time is the median of --trials trials of
// about 0.3 s of back-to-back calls, single and mixed alternating.

#include "gpt.h"

#include <d9d/nn/linear.h>
#include <d9d/peft.h>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace {

constexpr int64_t kRank = 16;

double per_call_us(const std::function<void()>& fn, int64_t iterations) {
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iterations; ++i) fn();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() /
         static_cast<double>(iterations);
}

int64_t calibrate(const std::function<void()>& fn) {
  fn();
  const double us = per_call_us(fn, 2);
  return std::max<int64_t>(2, static_cast<int64_t>(0.3e6 / std::max(us, 1.0)));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Medians of alternating trials of each function, microseconds per call.
std::vector<double> time_alternating(const std::vector<std::function<void()>>& fns, int trials) {
  std::vector<int64_t> iterations;
  for (const auto& fn : fns) iterations.push_back(calibrate(fn));
  std::vector<std::vector<double>> samples(fns.size());
  for (int t = 0; t < trials; ++t) {
    for (size_t i = 0; i < fns.size(); ++i) samples[i].push_back(per_call_us(fns[i], iterations[i]));
  }
  std::vector<double> out;
  for (auto& s : samples) out.push_back(median(s));
  return out;
}

std::vector<std::string> row_adapters(int64_t rows, int adapters) {
  std::vector<std::string> names;
  for (int64_t i = 0; i < rows; ++i) names.push_back("a" + std::to_string(i % adapters));
  return names;
}

d9d::peft::hf::LoraConfig lora_config(const std::string& targets_regex) {
  d9d::peft::hf::LoraConfig config;
  config.r = kRank;
  config.lora_alpha = 2.0 * kRank;
  config.init = d9d::peft::LoRAInit::Random;  // B != 0: the low-rank products are real work
  config.target_modules.regex = targets_regex;
  return config;
}

struct Row {
  std::string what;
  int adapters;
  double plain_us, single_us, mixed_us;
};

/// The base, one adapter for every row, and `adapters` adapters mixed, of `model` on `input`.
template <typename Model>
Row measure(const std::string& what, Model& model, const at::Tensor& input, int adapters, int trials) {
  const auto names = row_adapters(input.size(0), adapters);
  d9d::peft::set_adapter(*model, "a0");
  auto plain = [&] {
    d9d::peft::DisableAdapters off(*model);
    model->forward(input);
  };
  auto single = [&] { model->forward(input); };
  auto mixed = [&] {
    d9d::peft::MixedBatchScope scope(*model, names);
    model->forward(input);
  };
  auto scope_only = [&] { d9d::peft::MixedBatchScope scope(*model, names); };
  const auto t = time_alternating({plain, single, mixed, scope_only}, trials);
  std::fprintf(stderr, "%s, %d adapters: a MixedBatchScope alone takes %.0f us\n", what.c_str(), adapters, t[3]);
  return {what, adapters, t[0], t[1], t[2]};
}

struct OneLayerImpl : torch::nn::Module {
  OneLayerImpl() : proj(register_module("proj", d9d::nn::Linear(torch::nn::LinearOptions(4096, 4096).bias(false)))) {}
  at::Tensor forward(const at::Tensor& x) { return proj(x); }
  d9d::nn::Linear proj;
};
TORCH_MODULE(OneLayer);

[[noreturn]] void usage(const char* error) {
  std::fprintf(stderr, "%s\nusage: bench_mixed_batch [--csv] [--trials N] [--threads N] [--case linear|gpt]\n", error);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  bool csv = false;
  int trials = 7;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + arg).c_str());
      return argv[++i];
    };
    if (arg == "--csv") csv = true;
    else if (arg == "--trials") trials = std::stoi(value());
    else if (arg == "--threads") at::set_num_threads(std::stoi(value()));
    else if (arg == "--case") only = value();
    else usage(("unknown argument " + arg).c_str());
  }
  if (trials < 1) usage("--trials must be >= 1");
  torch::NoGradGuard no_grad;
  std::vector<Row> rows;
  for (const int adapters : {1, 4, 16}) {
    if (only.empty() || only == "linear") {
      torch::manual_seed(0);
      OneLayer model;
      model->eval();
      for (int a = 0; a < adapters; ++a) d9d::peft::hf::add_adapter(*model, "a" + std::to_string(a), lora_config("proj"));
      const at::Tensor x = torch::randn({512, 4096});
      rows.push_back(measure("linear 4096x4096 512 rows", model, x, adapters, trials));
    }
    if (only.empty() || only == "gpt") {
      torch::manual_seed(0);
      trainer::Gpt model(trainer::GptConfig{26, 17, 128, 2, 4, 256});
      model->eval();
      for (int a = 0; a < adapters; ++a) {
        d9d::peft::hf::add_adapter(*model, "a" + std::to_string(a), lora_config(R"(.*_proj)"));
      }
      const at::Tensor ids = torch::randint(0, 26, {64, 16});
      rows.push_back(measure("trainer GPT (default) 64x16 tokens", model, ids, adapters, trials));
    }
  }
  if (csv) {
    std::printf("case,adapters,plain_us,single_us,mixed_us\n");
    for (const auto& r : rows) {
      std::printf("%s,%d,%.1f,%.1f,%.1f\n", r.what.c_str(), r.adapters, r.plain_us, r.single_us, r.mixed_us);
    }
    return 0;
  }
  std::printf("| case | adapters | base alone (us) | one adapter (us) | mixed (us) | mixed / one adapter |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  for (const auto& r : rows) {
    std::printf("| %s | %d | %.0f | %.0f | %.0f | %.2f |\n", r.what.c_str(), r.adapters, r.plain_us, r.single_us,
                r.mixed_us, r.mixed_us / r.single_us);
  }
  return 0;
}
