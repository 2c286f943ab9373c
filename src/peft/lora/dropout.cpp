#include "dropout.h"

#include <d9d/detail/torch_compat.h>

#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace d9d::peft::lora {

namespace {

/// A seed from LibTorch's default CPU generator, so `torch::manual_seed`
/// makes masks reproducible (without allocating a tensor to draw it).
uint64_t draw_seed() { return d9d::detail::torch_compat::draw_cpu_random64(); }

uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}

// The mask kernel is compiled for AVX-512 and AVX2 as well as the baseline,
// picked at load time (GCC function multiversioning on x86-64): vectorised it
// is about 12x faster than one scalar hash per element.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define D9D_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define D9D_MULTIVERSION
#endif

/// `dst[i] = src[i] * keep`, or 0 where the hash of (seed, first + i) falls
/// below `threshold`. One 32-bit hash per element, no branches: vectorises.
D9D_MULTIVERSION
void mask_block(const float* __restrict src, float* __restrict dst, int64_t count, uint32_t first, uint32_t seed_a,
                uint32_t seed_b, uint32_t threshold, float keep) {
  for (int64_t i = 0; i < count; ++i) {
    uint32_t h = (first + static_cast<uint32_t>(i)) * 0x9E3779B1u + seed_a;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= seed_b;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    dst[i] = h < threshold ? 0.0f : src[i] * keep;
  }
}

/// `out = x * mask`, the mask a function of (seed, element index) alone: 0
/// with probability p (resolution 2^-32), `keep` otherwise. The same seed
/// gives the same mask, which is how backward gets it back without storing it.
at::Tensor masked(const at::Tensor& x_in, uint64_t seed, double p, float keep) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const double scaled = std::round(p * 4294967296.0);
  const uint32_t threshold = scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(scaled);
  const uint32_t seed_a = static_cast<uint32_t>(seed);
  const uint32_t seed_b = static_cast<uint32_t>(seed >> 32);
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    // Blocks never straddle a multiple of 2^32 elements, whose index bits
    // beyond 32 go into the seed.
    for (int64_t i = begin; i < end;) {
      const int64_t high = i >> 32;
      const int64_t stop = std::min<int64_t>(end, (high + 1) << 32);
      const uint32_t salt = high == 0 ? seed_b : seed_b ^ mix32(static_cast<uint32_t>(high));
      mask_block(src + i, dst + i, stop - i, static_cast<uint32_t>(i), seed_a, salt, threshold, keep);
      i = stop;
    }
  });
  return out;
}

}  // namespace

at::Tensor CpuDropout::forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, double p, double keep) {
  const uint64_t seed = draw_seed();
  ctx->saved_data["seed"] = static_cast<int64_t>(seed);
  ctx->saved_data["p"] = p;
  ctx->saved_data["keep"] = keep;
  return masked(x, seed, p, static_cast<float>(keep));
}

torch::autograd::variable_list CpuDropout::backward(torch::autograd::AutogradContext* ctx,
                                                    torch::autograd::variable_list grads) {
  const auto seed = static_cast<uint64_t>(ctx->saved_data["seed"].toInt());
  const double p = ctx->saved_data["p"].toDouble();
  const double keep = ctx->saved_data["keep"].toDouble();
  return {masked(grads[0], seed, p, static_cast<float>(keep)), at::Tensor(), at::Tensor()};
}

}  // namespace d9d::peft::lora
