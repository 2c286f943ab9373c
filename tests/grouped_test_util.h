#pragma once
// What the grouped-layer tests share: the per-expert reference, group sizes, comparisons.

#include "toy_moe.h"

#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <random>
#include <vector>

namespace grouped_test {

/// `x[slice of group g] @ W[g]`, group after group.
inline at::Tensor per_expert(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& sizes) {
  std::vector<at::Tensor> outs;
  int64_t begin = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    outs.push_back(x.narrow(0, begin, sizes[g]).matmul(w[static_cast<int64_t>(g)]));
    begin += sizes[g];
  }
  return at::cat(outs);
}

inline at::Tensor sizes_tensor(const std::vector<int64_t>& sizes) { return torch::tensor(sizes, torch::kLong); }

inline double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return a.numel() == 0 ? 0.0 : (a - b).abs().max().item<double>();
}

/// Random token counts for `groups` groups summing to `tokens`, some empty.
inline std::vector<int64_t> random_sizes(std::mt19937& rng, int64_t groups, int64_t tokens) {
  std::vector<int64_t> sizes(static_cast<size_t>(groups), 0);
  std::uniform_int_distribution<int64_t> pick(0, groups / 2);  // half the groups stay empty
  for (int64_t t = 0; t < tokens; ++t) ++sizes[static_cast<size_t>(pick(rng))];
  return sizes;
}

/// The model's output without recording gradients.
inline at::Tensor run(toy::ToyMoE& model, const at::Tensor& x) {
  torch::NoGradGuard g;
  return model->forward(x);
}

}  // namespace grouped_test
