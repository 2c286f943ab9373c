#pragma once

// Hugging Face PEFT's LoRA on 3-D expert parameters (`LoraConfig(target_parameters=[...])`)
// and this library's grouped expert layers: how the two describe the same adapter.

#include <torch/arg.h>

#include <string>

namespace d9d::peft::hf {

/// How the Hugging Face model that PEFT adapted stores an expert parameter,
/// which decides what PEFT calls its "in" and "out" features and so the
/// layout of `lora_A` / `lora_B` in the file (PEFT 0.21's `ParamWrapper`;
/// `tests/peft_reference/moe_target_parameters.md` has the details). This
/// library's grouped layer is always `[E, in, out]`.
///
/// | value | Hugging Face storage | examples | file factors |
/// |---|---|---|---|
/// | `out_in` (default) | `[E, out, in]`, no `is_transposed` | Qwen3-MoE, Mixtral, DeepSeek, OLMoE | `lora_A` `[r·E, in]`, `lora_B` `[out, r·E]` |
/// | `in_out` | `[E, in, out]` on a module with `is_transposed = True` | GPT-OSS | as `out_in` |
/// | `in_out_undeclared` | `[E, in, out]` without `is_transposed` | Llama 4 | `lora_A` `[r·E, out]`, `lora_B` `[in, r·E]` (PEFT swaps in and out) |
///
/// When loading, the shapes tell `in_out_undeclared` from the other two
/// unless the layer is square (`in == out`, or a fused `gate_up_proj` with
/// `d == 2·ff`): only then is this option consulted. With one expert (E = 1)
/// `in_out` is refused both ways: PEFT's own forward fails on such a
/// parameter unless it is square, and then adds the delta untransposed.
enum class ExpertStorage { out_in, in_out, in_out_undeclared };

/// "out_in", "in_out" or "in_out_undeclared".
std::string to_string(ExpertStorage storage);

/// Options for grouped expert layers in PEFT adapter files.
///
/// ```
/// auto experts = d9d::peft::hf::ExpertOptions().storage(d9d::peft::hf::ExpertStorage::in_out_undeclared);
/// ```
struct ExpertOptions {
  /// How the model PEFT saw stored the experts (see `ExpertStorage`).
  TORCH_ARG(ExpertStorage, storage) = ExpertStorage::out_in;
};

}  // namespace d9d::peft::hf
