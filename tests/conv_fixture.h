#pragma once
// PEFT's conv fixture (tests/fixtures/hf_peft/conv) for the unit tests: its
// directory, the twin net with its base weights, and its input.
#include "conv_model.h"
#include "test_util.h"

#include <d9d/model_state/io/safetensors.h>
#include <d9d/model_state/load.h>
#include <d9d/model_state/mapper/adapters.h>

#include <string>

namespace d9d_test {

inline const std::string kConv = std::string(D9D_FIXTURES_DIR) + "/hf_peft/conv";

/// The fixture's net with its base weights, in eval mode.
inline convnet::ConvNet conv_base() {
  convnet::ConvNet model;
  namespace ms = d9d::model_state;
  ms::load_model_state(kConv + "/model.safetensors", *ms::identity_mapper_from_module(*model), *model, quiet());
  model->eval();
  return model;
}

/// The fixture's input `x` `[B, 3, 8, 8]`.
inline at::Tensor conv_x() {
  return d9d::model_state::SafetensorsFile::open(kConv + "/inputs.safetensors")->get("x");
}

}  // namespace d9d_test
