#pragma once
// The training check every method's tests share: a few AdamW steps lower the
// loss and change exactly the method's tensors.
#include <d9d/peft.h>

#include <ATen/ATen.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <string>
#include <utility>

namespace d9d_test {

/// `steps` AdamW steps at `learning_rate` on `loss_of()` over
/// `trainable_parameters(model)`, in train mode: the loss, in eval mode,
/// fell by more than 1e-3, and every parameter whose key `is_adapter` accepts
/// changed while every other stayed bit for bit as it was. Returns the first
/// and last loss; `model` is left in eval mode.
inline std::pair<double, double> expect_training_changes_only(torch::nn::Module& model,
                                                              const std::function<at::Tensor()>& loss_of,
                                                              const std::function<bool(const std::string&)>& is_adapter,
                                                              double learning_rate, int steps = 10) {
  std::map<std::string, at::Tensor> before;
  for (const auto& p : model.named_parameters()) before[p.key()] = p.value().detach().clone();
  const auto eval_loss = [&] {
    model.eval();
    torch::NoGradGuard g;
    return loss_of().item<double>();
  };
  const double first = eval_loss();
  torch::optim::AdamW opt(d9d::peft::trainable_parameters(model), torch::optim::AdamWOptions(learning_rate));
  model.train();
  for (int step = 0; step < steps; ++step) {
    opt.zero_grad();
    loss_of().backward();
    opt.step();
  }
  const double last = eval_loss();
  EXPECT_LT(last, first - 1e-3);
  for (const auto& p : model.named_parameters()) {
    const bool adapter = is_adapter(p.key());
    EXPECT_EQ(!torch::equal(p.value(), before.at(p.key())), adapter)
        << p.key() << (adapter ? " is the method's and did not move" : " is not the method's but changed");
  }
  return {first, last};
}

/// Keys containing `part`.
inline std::function<bool(const std::string&)> key_contains(std::string part) {
  return [part = std::move(part)](const std::string& key) { return key.find(part) != std::string::npos; };
}

/// A language model's next-token loss on `ids` [batch, time]: `model` maps
/// `ids[:, :-1]` to logits [batch, time - 1, vocab].
template <typename Model>
std::function<at::Tensor()> next_token_loss(Model& model, const at::Tensor& ids) {
  return [&model, ids] {
    auto logits = model->forward(ids.slice(1, 0, -1));
    return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), ids.slice(1, 1).reshape({-1}));
  };
}

}  // namespace d9d_test
