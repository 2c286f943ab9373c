#pragma once
// OFT's rotation written out from its formulas, for the tests that check the
// library's OFT layers against it (test_oft.cpp, test_oft_conv.cpp).
#include <d9d/peft.h>

#include <vector>

namespace d9d_test {

/// The skew-symmetric block from its upper triangle, element by element (row-major, as triu_indices).
inline at::Tensor skew_by_hand(const at::Tensor& row, int64_t b) {
  auto q = torch::zeros({b, b}, row.options());
  int64_t k = 0;
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = i + 1; j < b; ++j, ++k) {
      q[i][j] = row[k];
      q[j][i] = -row[k];
    }
  }
  return q;
}

/// PEFT's Neumann branch written as a sum: I + 2(Q + ... + Q^(k-2)) + Q^(k-1) (k >= 4).
inline at::Tensor neumann_by_hand(const at::Tensor& q, int64_t k) {
  auto eye = torch::eye(q.size(0), q.options());
  auto sum = eye.clone(), power = eye.clone();
  for (int64_t p = 1; p <= k - 2; ++p) {
    power = power.mm(q);
    sum = sum + 2 * power;
  }
  return sum + power.mm(q);
}

/// The block-diagonal rotation of an adapter from the formulas above.
inline at::Tensor rotation_by_hand(const d9d::peft::OFTAdapterImpl& a) {
  const auto& o = a.options();
  const int64_t b = a.blocks().block_size;
  std::vector<at::Tensor> blocks;
  for (int64_t i = 0; i < a.blocks().r; ++i) {
    const auto q = skew_by_hand(a.oft_R->weight.detach()[o.block_share() ? 0 : i].to(at::kDouble), b);
    const auto eye = torch::eye(b, q.options());
    blocks.push_back(o.use_cayley_neumann() ? neumann_by_hand(q, o.num_cayley_neumann_terms())
                                            : (eye - q).mm(torch::inverse(eye + q)));
  }
  return torch::block_diag(blocks).to(at::kFloat);
}

}  // namespace d9d_test
