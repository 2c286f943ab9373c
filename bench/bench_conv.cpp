// One Conv2d layer on the CPU, fp32: the plain layer against the same layer
// adapted by each method that adapts Conv2d (LoRA, DoRA, IA3, LoHa, LoKr,
// OFT), forward (no grad) and forward + backward, for 1x1 and 3x3 kernels.
// bench/compare_conv_peft.py runs it next to Hugging Face PEFT's layers for
// the same configs and prints one table.
//
//   ./build-torch2/bench/bench_conv                    # table: 64 -> 64 channels, 8 x 32 x 32 inputs
//   ./build-torch2/bench/bench_conv --csv --threads 2  # for bench/compare_conv_peft.py
//
// The layer: d9d::nn::Conv2d(C, C, k, padding k / 2), bias on. Each method
// is injected with inject_peft_and_freeze from its d9d JSON config (the
// configs are the `kMethods` table; compare_conv_peft.py builds PEFT's
// equivalents) and starts from random adapter weights (`init_weights`
// false, or LoRA's B drawn small), so no factor is an all-zero product.
// Forward + backward: the input requires grad (the layer sits inside a
// network), loss mean(y^2), gradients set to none before each step as an
// optimizer's zero_grad does; the plain layer's weights are frozen, so its
// backward is the input gradient alone.
//
// Time: step_timing.h, median of --trials trials of about --trial-s seconds
// of back-to-back steps, each method alternating with its own plain layer.

#include "step_timing.h"

#include <d9d/nn/conv2d.h>
#include <d9d/peft.h>

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

struct Shape {
  int64_t channels = 64;
  int64_t size = 32;  // height = width
  int64_t batch = 8;
  int64_t rank = 8;
};

struct NetImpl : torch::nn::Module {
  NetImpl(int64_t channels, int64_t kernel)
      : conv(register_module(
            "conv", d9d::nn::Conv2d(torch::nn::Conv2dOptions(channels, channels, kernel).padding(kernel / 2)))) {}
  at::Tensor forward(const at::Tensor& x) { return conv(x); }
  d9d::nn::Conv2d conv;
};
TORCH_MODULE(Net);

/// Each method's d9d JSON config for the layer `conv` at rank `r` (PEFT's
/// equivalents are in compare_conv_peft.py: keep them in step).
std::vector<std::pair<std::string, std::string>> methods(int64_t r) {
  const std::string rank = std::to_string(r), alpha = std::to_string(2 * r);
  const std::string rank_alpha = "\"r\":" + rank + ",\"alpha\":" + alpha;
  const std::string lora = rank_alpha + ",\"dropout\":0.0";
  return {
      {"lora", "{\"kind\":\"lora\",\"module_name_pattern\":\"conv\",\"params\":{" + lora + "}}"},
      {"dora", "{\"kind\":\"lora\",\"module_name_pattern\":\"conv\",\"params\":{" + lora + ",\"use_dora\":true}}"},
      {"ia3", "{\"kind\":\"ia3\",\"module_name_pattern\":\"conv\"}"},
      {"loha", "{\"kind\":\"loha\",\"module_name_pattern\":\"conv\",\"params\":{" + rank_alpha +
                   ",\"init_weights\":false}}"},
      {"lokr", "{\"kind\":\"lokr\",\"module_name_pattern\":\"conv\",\"params\":{" + rank_alpha +
                   ",\"init_weights\":false}}"},
      {"oft", "{\"kind\":\"oft\",\"module_name_pattern\":\"conv\",\"params\":{\"oft_block_size\":32,"
              "\"init_weights\":false}}"},
  };
}

struct Row {
  std::string method;
  int64_t kernel;
  std::string mode, variant;
  double ms;
};

std::vector<Row> measure(const std::string& method, const std::string& config, int64_t kernel, const Shape& s,
                         int trials, double trial_s) {
  torch::manual_seed(0);
  Net plain(s.channels, kernel), adapted(s.channels, kernel);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : plain->parameters()) p.requires_grad_(false);
    adapted->conv->weight.copy_(plain->conv->weight);
    adapted->conv->bias.copy_(plain->conv->bias);
  }
  auto peft_method = d9d::peft::peft_method_from_config(d9d::peft::parse_peft_config(config, method));
  d9d::peft::inject_peft_and_freeze(*peft_method, *adapted);
  {
    torch::NoGradGuard no_grad;
    for (const auto& item : adapted->named_parameters()) {
      if (item.key().find("lora_B") != std::string::npos) item.value().normal_(0.0, 0.01);
      if (item.key().find("ia3_l") != std::string::npos) item.value().uniform_(0.5, 1.5);
    }
  }
  adapted->eval();
  plain->eval();
  const at::Tensor x = at::randn({s.batch, s.channels, s.size, s.size});
  const at::Tensor x_grad = x.clone().requires_grad_(true);
  auto forward = [&](Net& net) {
    return [&net, &x] {
      torch::NoGradGuard no_grad;
      const at::Tensor y = net->forward(x);
      (void)y;
    };
  };
  auto forward_backward = [&](Net& net) {
    return [&net, &x_grad] {
      for (auto& p : net->parameters()) p.mutable_grad() = at::Tensor();
      x_grad.mutable_grad() = at::Tensor();
      net->forward(x_grad).square().mean().backward();
    };
  };
  std::vector<Row> rows;
  for (const std::string mode : {"fwd", "fwdbwd"}) {
    const std::vector<std::function<void()>> steps =
        mode == "fwd" ? std::vector<std::function<void()>>{forward(plain), forward(adapted)}
                      : std::vector<std::function<void()>>{forward_backward(plain), forward_backward(adapted)};
    const auto ms = d9d_bench::time_alternating(steps, trials, trial_s);
    rows.push_back({method, kernel, mode, "plain", ms[0]});
    rows.push_back({method, kernel, mode, "adapted", ms[1]});
  }
  return rows;
}

std::vector<std::string> parse_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(item);
  return out;
}

[[noreturn]] void usage(const std::string& error) {
  std::fprintf(stderr,
               "%s\nusage: bench_conv [--csv] [--methods lora,dora,ia3,loha,lokr,oft] [--kernels 1,3] "
               "[--channels 64] [--size 32] [--batch 8] [--rank 8] [--threads N] [--trials 5] [--trial-s 0.3]\n",
               error.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  bool csv = false;
  int trials = 5;
  double trial_s = 0.3;
  Shape shape;
  std::vector<std::string> chosen;
  std::vector<int64_t> kernels = {1, 3};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value after " + arg);
      return argv[++i];
    };
    if (arg == "--csv") csv = true;
    else if (arg == "--methods") chosen = parse_list(value());
    else if (arg == "--kernels") {
      kernels.clear();
      for (const auto& k : parse_list(value())) kernels.push_back(std::stoll(k));
    }
    else if (arg == "--channels") shape.channels = std::stoll(value());
    else if (arg == "--size") shape.size = std::stoll(value());
    else if (arg == "--batch") shape.batch = std::stoll(value());
    else if (arg == "--rank") shape.rank = std::stoll(value());
    else if (arg == "--threads") at::set_num_threads(std::stoi(value()));
    else if (arg == "--trials") trials = std::stoi(value());
    else if (arg == "--trial-s") trial_s = std::stod(value());
    else usage("unknown argument " + arg);
  }
  if (trials < 1) usage("--trials must be >= 1");
  for (const int64_t k : kernels) {
    if (k != 1 && k != 3) usage("--kernels: 1 and 3 are measured, got " + std::to_string(k));
  }
  const auto all = methods(shape.rank);
  std::vector<std::pair<std::string, std::string>> run;
  for (const auto& name : chosen) {
    bool found = false;
    for (const auto& m : all) found = found || m.first == name;
    if (!found) usage("--methods: unknown method '" + name + "'; known: lora, dora, ia3, loha, lokr, oft");
  }
  for (const auto& m : all) {
    if (chosen.empty() || std::find(chosen.begin(), chosen.end(), m.first) != chosen.end()) run.push_back(m);
  }
  std::vector<Row> rows;
  for (const int64_t k : kernels) {
    for (const auto& [name, config] : run) {
      const auto measured = measure(name, config, k, shape, trials, trial_s);
      rows.insert(rows.end(), measured.begin(), measured.end());
    }
  }
  if (csv) {
    for (const auto& r : rows) {
      std::printf("time,%s,%lld,%s,%s,%.4f\n", r.method.c_str(), static_cast<long long>(r.kernel), r.mode.c_str(),
                  r.variant.c_str(), r.ms);
    }
    return 0;
  }
  std::printf("bench_conv: %lld -> %lld channels, %lld x %lld x %lld inputs, r %lld, fp32, %d threads\n\n",
              static_cast<long long>(shape.channels), static_cast<long long>(shape.channels),
              static_cast<long long>(shape.batch), static_cast<long long>(shape.size),
              static_cast<long long>(shape.size), static_cast<long long>(shape.rank), at::get_num_threads());
  std::printf("| method | kernel | step | plain ms | adapted ms | adapted / plain |\n");
  std::printf("|---|---:|---|---:|---:|---:|\n");
  for (size_t i = 0; i + 1 < rows.size(); i += 2) {
    const Row& p = rows[i];
    const Row& a = rows[i + 1];
    std::printf("| %s | %lldx%lld | %s | %.3f | %.3f | %.3fx |\n", a.method.c_str(), static_cast<long long>(a.kernel),
                static_cast<long long>(a.kernel), a.mode == "fwd" ? "forward" : "forward+backward", p.ms, a.ms,
                a.ms / p.ms);
  }
  return 0;
}
