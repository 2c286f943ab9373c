#pragma once

/// d9d-peft: parameter-efficient fine-tuning for LibTorch.
///
/// ```
/// d9d::peft::LoRA lora({".*_proj", d9d::peft::LoRAParameters().r(8).alpha(16).dropout(0.05)});
/// auto mapper = d9d::peft::inject_peft_and_freeze(lora, *model);
/// d9d::model_state::load_state_dict(*model, checkpoint, *mapper);
/// // ... train d9d::peft::trainable_parameters(*model) ...
/// d9d::peft::merge_peft(lora, *model);
/// ```

#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/io/source.h>
#include <d9d/model_state/io/stream.h>
#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>
#include <d9d/model_state/mapper/compose/parallel.h>
#include <d9d/model_state/mapper/compose/sequential.h>
#include <d9d/model_state/mapper/leaf/identity.h>
#include <d9d/model_state/mapper/leaf/rename.h>
#include <d9d/nn/conv2d.h>
#include <d9d/nn/embedding.h>
#include <d9d/nn/grouped_linear.h>
#include <d9d/nn/linear.h>
#include <d9d/peft/all/config.h>
#include <d9d/peft/all/method.h>
#include <d9d/peft/adapter_layer.h>
#include <d9d/peft/adapters.h>
#include <d9d/peft/applicator.h>
#include <d9d/peft/base.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/full_tune/method.h>
#include <d9d/peft/hf/adapter.h>
#include <d9d/peft/hf/combine.h>
#include <d9d/peft/hf/config.h>
#include <d9d/peft/hf/files.h>
#include <d9d/peft/hf/merge.h>
#include <d9d/peft/hf/target_parameters.h>
#include <d9d/peft/hotswap.h>
#include <d9d/peft/ia3/method.h>
#include <d9d/peft/loha/method.h>
#include <d9d/peft/oft/method.h>
#include <d9d/peft/lokr/method.h>
#include <d9d/peft/vera/method.h>
#include <d9d/peft/inject.h>
#include <d9d/peft/lora/layer.h>
#include <d9d/peft/lora/method.h>
#include <d9d/peft/lora/weighted.h>
#include <d9d/peft/mixed_batch.h>
#include <d9d/peft/module_tree.h>
#include <d9d/peft/pattern.h>
#include <d9d/peft/registry.h>
