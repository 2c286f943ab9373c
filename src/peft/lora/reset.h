#pragma once
// How a LoRA adapter's factors start (LoRAInit), shared by the layer types
// whose A and B are modules with `reset_parameters()` and a `weight`.

#include <d9d/peft/errors.h>
#include <d9d/peft/lora/options.h>

#include <fmt/format.h>

#include <ATen/core/grad_mode.h>

namespace d9d::peft::detail {

template <class Adapter>
void reset_lora_factors(Adapter& a) {
  at::NoGradGuard no_grad;
  switch (a.options().init()) {
    case LoRAInit::Default:
      a.lora_A->reset_parameters();
      a.lora_B->weight.zero_();
      break;
    case LoRAInit::Gaussian:
      a.lora_A->weight.normal_(0.0, 1.0 / static_cast<double>(a.options().r()));
      a.lora_B->weight.zero_();
      break;
    case LoRAInit::Random:
      a.lora_A->reset_parameters();
      a.lora_B->reset_parameters();
      break;
    case LoRAInit::PiSSA:
    case LoRAInit::OLoRA:
      throw PeftError(fmt::format("the {} initialisation starts from a Linear layer's weight matrix; this layer has "
                                  "no such weight (as in PEFT). Use it on Linear layers only, or \"default\" here",
                                  lora_init_name(a.options())));
  }
}

}  // namespace d9d::peft::detail
