// The d9d-peft lifecycle in a page: build -> inject -> load -> train -> merge.
#include <d9d/peft.h>

#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/module.h>
#include <torch/optim/sgd.h>
#include <torch/utils.h>

#include <cstdio>

// A model written the LibTorch way; d9d::nn::Linear is the drop-in for
// torch::nn::Linear that PEFT methods can adapt through the typed members.
struct MlpImpl : torch::nn::Module {
  MlpImpl()
      : up_proj(register_module("up_proj", d9d::nn::Linear(16, 64))),
        down_proj(register_module("down_proj", d9d::nn::Linear(64, 4))) {}
  torch::Tensor forward(const torch::Tensor& x) { return down_proj(torch::nn::functional::relu(up_proj(x))); }
  d9d::nn::Linear up_proj, down_proj;
};
TORCH_MODULE(Mlp);

int main() {
  torch::manual_seed(0);
  // Stands in for a checkpoint of the original model (keys up_proj.weight, ...).
  const d9d::model_state::StateDict pretrained = d9d::model_state::module_state_dict(*Mlp());

  Mlp model;
  d9d::peft::LoRA lora({".*proj", d9d::peft::LoRAParameters().r(8).alpha(16)});
  auto mapper = d9d::peft::inject_peft_and_freeze(lora, model);
  // The mapper renames up_proj.weight -> up_proj.base.weight etc.; the LoRA
  // weights are fresh, so the strict load does not report them missing.
  d9d::model_state::load_state_dict(*model, pretrained, *mapper);

  // A toy regression task on random data.
  const torch::Tensor x = torch::randn({256, 16});
  const torch::Tensor y = torch::sin(x.matmul(torch::randn({16, 4}) * 0.5));

  auto params = d9d::peft::trainable_parameters(*model);
  torch::optim::SGD optimizer(params, torch::optim::SGDOptions(0.1).momentum(0.9));
  for (int step = 1; step <= 60; ++step) {
    optimizer.zero_grad();
    auto loss = torch::nn::functional::mse_loss(model(x), y);
    loss.backward();
    optimizer.step();
    if (step == 1 || step % 10 == 0) std::printf("step %2d  loss %.5f\n", step, loss.item<double>());
  }

  int64_t trainable = 0, total = 0;
  for (const auto& p : params) trainable += p.numel();
  for (const auto& p : model->parameters()) total += p.numel();
  std::printf("trainable parameters: %lld of %lld\n", static_cast<long long>(trainable),
              static_cast<long long>(total));

  torch::NoGradGuard no_grad;
  const torch::Tensor trained = model(x);
  d9d::peft::merge_peft(lora, model);  // W += (alpha / r) * B @ A; the plain layers are back
  const double diff = (model(x) - trained).abs().max().item<double>();
  std::printf("max |merged - trained| = %.2e\n", diff);

  std::printf("parameters after merge:");
  for (const auto& item : model->named_parameters()) std::printf(" %s", item.key().c_str());
  std::printf("\n");
  return diff < 1e-4 ? 0 : 1;
}
