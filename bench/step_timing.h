#pragma once
// Wall-clock timing of CPU steps for the plain-executable benchmarks
// (bench_moe, bench_conv): a step's time is the median of trials of about
// `trial_s` seconds of back-to-back calls, the steps compared alternating
// trial by trial so that drift on a shared machine hits every side alike.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>

namespace d9d_bench {

/// Milliseconds per call over `iterations` back-to-back calls of `fn`.
inline double per_step_ms(const std::function<void()>& fn, int64_t iterations) {
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iterations; ++i) fn();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() /
         static_cast<double>(iterations);
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Medians of alternating trials of each step, milliseconds per step.
inline std::vector<double> time_alternating(const std::vector<std::function<void()>>& steps, int trials,
                                            double trial_s) {
  std::vector<int64_t> iterations;
  for (const auto& step : steps) {
    step();  // warm-up
    const double ms = per_step_ms(step, 1);
    iterations.push_back(std::max<int64_t>(1, static_cast<int64_t>(trial_s * 1e3 / std::max(ms, 1e-3))));
  }
  std::vector<std::vector<double>> samples(steps.size());
  for (int t = 0; t < trials; ++t) {
    for (size_t i = 0; i < steps.size(); ++i) samples[i].push_back(per_step_ms(steps[i], iterations[i]));
  }
  std::vector<double> out;
  for (auto& s : samples) out.push_back(median(s));
  return out;
}

}  // namespace d9d_bench
