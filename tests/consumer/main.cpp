// Smoke test of the installed package: headers, library and dependencies
// resolve through find_package(d9d_peft), and the basic lifecycle works.
#include <d9d/peft.h>

#include <torch/nn/functional/activation.h>
#include <torch/nn/module.h>
#include <torch/utils.h>

#include <iostream>

struct FooImpl : torch::nn::Module {
  FooImpl() : fc1(register_module("fc1", d9d::nn::Linear(8, 16))), fc2(register_module("fc2", d9d::nn::Linear(16, 2))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::nn::functional::relu(fc1(x))); }
  d9d::nn::Linear fc1, fc2;
};
TORCH_MODULE(Foo);

namespace {
int failures = 0;
void check(bool ok, const char* what) {
  if (!ok) {
    std::cerr << "consumer: FAILED: " << what << "\n";
    ++failures;
  }
}
}  // namespace

int main() {
  try {
    torch::manual_seed(0);
    Foo model;
    const torch::Tensor x = torch::randn({4, 8});
    const torch::Tensor before = model(x).detach();

    d9d::peft::LoRA lora({"fc.", d9d::peft::LoRAParameters().r(4).alpha(8)});
    auto mapper = d9d::peft::inject_peft_and_freeze(lora, model);
    check(mapper != nullptr, "inject_peft_and_freeze returned a mapper");
    check(torch::allclose(model(x), before), "output unchanged right after injection");

    const auto params = model->named_parameters();
    check(params.contains("fc1.lora_A.weight") && params["fc1.lora_A.weight"].requires_grad(),
          "fc1.lora_A.weight exists and is trainable");
    check(params.contains("fc1.base.weight") && !params["fc1.base.weight"].requires_grad(),
          "fc1.base.weight exists and is frozen");

    d9d::peft::merge_peft(lora, model);
    check(model->named_parameters().contains("fc1.weight"), "merge restores fc1.weight");
    check(torch::allclose(model(x), before), "output unchanged after merging untrained adapters");
  } catch (const std::exception& e) {
    std::cerr << "consumer: FAILED with exception: " << e.what() << "\n";
    return 1;
  }
  if (failures) return 1;
  std::cout << "consumer: ok\n";
  return 0;
}
