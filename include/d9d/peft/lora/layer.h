#pragma once

// The LoRA layers: the wrappers around linear layers, embeddings, grouped expert layers and Conv2d layers.
#include <d9d/peft/lora/conv2d.h>
#include <d9d/peft/lora/embedding.h>
#include <d9d/peft/lora/grouped_linear.h>
#include <d9d/peft/lora/linear.h>
#include <d9d/peft/lora/options.h>
