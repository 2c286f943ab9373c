#pragma once

// The LoRA layers: the wrappers around linear layers and embeddings.
#include <d9d/peft/lora/embedding.h>
#include <d9d/peft/lora/linear.h>
#include <d9d/peft/lora/options.h>
