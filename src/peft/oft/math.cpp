#include <d9d/peft/errors.h>
#include <d9d/peft/oft/math.h>

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <fmt/format.h>

namespace d9d::peft::oft {

int64_t adjust(int64_t in_features, int64_t value) {
  if (value >= in_features) return in_features;
  int64_t higher = value;
  while (higher <= in_features && in_features % higher != 0) ++higher;
  int64_t lower = value;
  while (lower > 1 && in_features % lower != 0) --lower;
  return value - lower <= higher - value ? lower : higher;
}

Blocks resolve(int64_t in_features, int64_t r, int64_t oft_block_size) {
  if ((r == 0) == (oft_block_size == 0) || r < 0 || oft_block_size < 0) {
    throw ConfigError("r, oft_block_size",
                      fmt::format("exactly one must be non-zero (got r = {}, oft_block_size = {})", r, oft_block_size));
  }
  Blocks b;
  if (r == 0) {
    b.block_size = in_features % oft_block_size != 0 || oft_block_size > in_features
                       ? adjust(in_features, oft_block_size)
                       : oft_block_size;
    b.r = in_features / b.block_size;
  } else {
    b.r = in_features % r != 0 || r > in_features ? adjust(in_features, r) : r;
    b.block_size = in_features / b.r;
  }
  return b;
}

std::vector<int64_t> weight_shape(const Blocks& blocks, bool block_share) {
  return {block_share ? 1 : blocks.r, blocks.block_size * (blocks.block_size - 1) / 2};
}

namespace {

/// Flat positions `row * b + col` of the strict upper triangle, in PEFT's triu_indices order.
at::Tensor upper_positions(int64_t block_size, const at::Device& device) {
  const at::Tensor rc = at::triu_indices(block_size, block_size, 1, at::TensorOptions().dtype(at::kLong).device(device));
  return rc[0] * block_size + rc[1];
}

}  // namespace

at::Tensor skew(const at::Tensor& vec, int64_t block_size) {
  const int64_t n = vec.size(0);
  const at::Tensor upper = at::zeros({n, block_size * block_size}, vec.options())
                               .index_copy(1, upper_positions(block_size, vec.device()), vec)
                               .view({n, block_size, block_size});
  return upper - upper.transpose(-2, -1);
}

at::Tensor cayley(const at::Tensor& vec, int64_t block_size, bool neumann, int64_t terms) {
  const int64_t n = vec.size(0);
  const at::Tensor q = skew(vec, block_size);
  at::Tensor rotation;
  if (neumann) {
    // PEFT's loop, term by term (its sum rounds in this order).
    rotation = at::eye(block_size, vec.options()).repeat({n, 1, 1});
    if (terms > 1) {
      rotation = at::add(rotation, q, 2.0);
      if (terms > 2) {
        at::Tensor power = at::bmm(q, q);
        rotation = at::add(rotation, power, 2.0);
        for (int64_t i = 3; i < terms - 1; ++i) {
          power = at::bmm(power, q);
          rotation = at::add(rotation, power, 2.0);
        }
        power = at::bmm(power, q);
        rotation = at::add(rotation, power);
      }
    }
  } else {
    // PEFT solves X (I + Q) = I - Q with a float32 identity (so at least float32).
    const at::Tensor eye = at::eye(block_size, vec.options().dtype(at::kFloat)).unsqueeze(0).expand({n, block_size, block_size});
    rotation = at::linalg_solve(eye + q, eye - q, /*left=*/false);
  }
  return rotation.to(vec.scalar_type());
}

at::Tensor project(const at::Tensor& vec, int64_t block_size, double eps) {
  const at::Tensor q = skew(vec, block_size);
  // PEFT: eps * 1 / torch.sqrt(torch.tensor(n)), a float32 scalar tensor.
  const at::Tensor radius = at::mul(at::reciprocal(at::sqrt(at::scalar_tensor(q.size(0), at::kLong))), eps);
  const at::Tensor zero = at::zeros({block_size, block_size}, q.options()).unsqueeze(0).expand_as(q);
  const at::Tensor diff = q - zero;
  const at::Tensor norm = at::linalg_vector_norm(q - zero, 2, at::IntArrayRef{1, 2}, /*keepdim=*/true);
  const at::Tensor out = at::where(norm <= radius, q, zero + radius * (diff / norm));
  return out.view({q.size(0), block_size * block_size}).index_select(1, upper_positions(block_size, q.device()));
}

at::Tensor expand_blocks(const at::Tensor& blocks, int64_t rank) {
  return blocks.size(0) == rank ? blocks : blocks.repeat({rank, 1, 1});
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& blocks) {
  const int64_t rank = blocks.size(0), block_size = blocks.size(1);
  std::vector<int64_t> split(x.sizes().begin(), x.sizes().end() - 1);
  split.push_back(rank);
  split.push_back(block_size);
  return at::einsum("...rk,rkc->...rc", {x.reshape(split), blocks}).reshape(x.sizes());
}

at::Tensor block_diagonal(const at::Tensor& blocks) { return at::block_diag(blocks.unbind(0)); }

namespace {

/// `(M @ Wᵀ)ᵀ` for `W` = `weight` seen as `[out, features]`, back in its dtype and shape.
at::Tensor rotated_rows(const at::Tensor& weight, const at::Tensor& m) {
  const at::Tensor flat = weight.reshape({weight.size(0), -1}).to(m.scalar_type());
  return at::mm(m.to(weight.device()), flat.t()).t().to(weight.scalar_type()).reshape(weight.sizes());
}

}  // namespace

at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& rotation) {
  return rotated_rows(weight, rotation);
}

at::Tensor unmerged_weight(const at::Tensor& weight, const at::Tensor& rotation) {
  return rotated_rows(weight, at::linalg_inv(rotation.to(at::kFloat)).to(rotation.scalar_type()));
}

}  // namespace d9d::peft::oft
