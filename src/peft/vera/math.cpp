#include <d9d/peft/vera/math.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Functions.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/linear.h>

#include <cmath>

namespace d9d::peft::vera {

namespace {

/// PEFT's `_kaiming_init`: the bound computed in double as Python does, then `uniform_` from `generator`.
void kaiming_uniform(at::Tensor& t, at::Generator& generator) {
  const double fan_in = static_cast<double>(t.size(1));
  const double std = std::sqrt(2.0) / std::sqrt(fan_in);
  const double bound = std::sqrt(3.0) * std;
  t.uniform_(-bound, bound, generator);
}

}  // namespace

std::pair<at::Tensor, at::Tensor> projections(int64_t r, int64_t max_out, int64_t max_in, int64_t key) {
  torch::NoGradGuard no_grad;
  at::Generator generator = at::detail::createCPUGenerator(static_cast<uint64_t>(key));
  at::Tensor a = at::empty({r, max_in}, at::kFloat);
  at::Tensor b = at::empty({max_out, r}, at::kFloat);
  kaiming_uniform(a, generator);
  kaiming_uniform(b, generator);
  return {a, b};
}

at::Tensor delta_weight(const at::Tensor& vera_A, const at::Tensor& vera_B, const at::Tensor& lambda_b,
                        const at::Tensor& lambda_d, int64_t in_features) {
  const auto dtype = vera_B.scalar_type();
  const bool to_fp32 = vera_B.device().is_cpu() && (dtype == at::kHalf || dtype == at::kBFloat16);
  auto prepared = [&](const at::Tensor& t) { return to_fp32 ? t.to(at::kFloat) : t; };
  const at::Tensor a = prepared(vera_A).slice(1, 0, in_features).to(lambda_d.device());
  const at::Tensor b = prepared(vera_B).slice(0, 0, lambda_b.size(0)).to(lambda_d.device());
  at::Tensor out = at::mm(prepared(lambda_b).unsqueeze(-1) * b, prepared(lambda_d).unsqueeze(-1) * a);
  return to_fp32 ? out.to(dtype) : out;
}

at::Tensor forward_term(const at::Tensor& x, const at::Tensor& vera_A, const at::Tensor& vera_B,
                        const at::Tensor& lambda_b, const at::Tensor& lambda_d) {
  const at::Tensor a = vera_A.slice(1, 0, x.size(-1)).to(x.device());
  const at::Tensor b = vera_B.slice(0, 0, lambda_b.size(0)).to(x.device());
  namespace F = torch::nn::functional;
  return lambda_b * F::linear(lambda_d * F::linear(x, a), b);
}

at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& delta) {
  return at::add(weight, delta.to(weight.device())).to(weight.scalar_type());
}

}  // namespace d9d::peft::vera
