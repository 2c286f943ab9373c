// PiSSA and OLoRA factors (Hugging Face PEFT's tuners/lora/layer.py
// `pissa_init`, `olora_init`; PyTorch's torch/_lowrank.py for `svd_lowrank`).
#include <d9d/peft/lora/init.h>

#include <ATen/Functions.h>

#include <cmath>
#include <tuple>

namespace d9d::peft::lora {

namespace {

/// `get_approximate_basis(a, q, niter)`: q orthonormal columns spanning a's range.
at::Tensor approximate_basis(const at::Tensor& a, int64_t q, int64_t niter) {
  const at::Tensor r = at::randn({a.size(-1), q}, a.options());
  at::Tensor basis = std::get<0>(at::linalg_qr(at::matmul(a, r)));
  for (int64_t i = 0; i < niter; ++i) {
    basis = std::get<0>(at::linalg_qr(at::matmul(a.t(), basis)));
    basis = std::get<0>(at::linalg_qr(at::matmul(a, basis)));
  }
  return basis;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_lowrank(const at::Tensor& a_in, int64_t q, int64_t niter) {
  const bool wide = a_in.size(0) < a_in.size(1);
  const at::Tensor a = wide ? a_in.t() : a_in;
  const at::Tensor basis = approximate_basis(a, q, niter);
  const at::Tensor b = at::matmul(basis.t(), a);
  auto [u, s, vh] = at::linalg_svd(b, /*full_matrices=*/false);
  at::Tensor v = vh.t();
  u = basis.matmul(u);
  if (wide) std::swap(u, v);
  return {u, s, v};
}

std::pair<at::Tensor, at::Tensor> pissa_factors(const at::Tensor& weight, int64_t r, double scale, int64_t niter) {
  const at::Tensor w = weight.detach().to(at::kFloat);
  at::Tensor u_r, s_r, vh_r;
  if (niter == 0) {
    auto [u, s, vh] = at::linalg_svd(w, /*full_matrices=*/false);
    u_r = u.narrow(1, 0, r);
    s_r = s.narrow(0, 0, r);
    vh_r = vh.narrow(0, 0, r);
  } else {
    auto [u, s, v] = svd_lowrank(w, r, niter);
    u_r = u;
    s_r = s;
    vh_r = v.t();
  }
  const at::Tensor root = s_r.div(scale).sqrt();
  at::Tensor a = at::diag(root).matmul(vh_r).contiguous();
  at::Tensor b = u_r.matmul(at::diag(root)).contiguous();
  return {a, b};
}

std::pair<at::Tensor, at::Tensor> olora_factors(const at::Tensor& weight, int64_t r) {
  const at::Tensor w = weight.detach().to(at::kFloat);
  auto [q, rr] = at::linalg_qr(w);
  return {rr.narrow(0, 0, r).contiguous(), q.narrow(1, 0, r).contiguous()};
}

}  // namespace d9d::peft::lora
