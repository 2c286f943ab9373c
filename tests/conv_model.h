#pragma once
// The small conv net of tests/fixtures/hf_peft/conv, written the way LibTorch
// users write models: conv1 = Conv2d(3, 8, 3, padding=1); conv2 = Conv2d(8, 8,
// 3, stride=2); head = Linear(72, 5);
// forward(x [B, 3, 8, 8]) = head(flatten(relu(conv2(relu(conv1(x)))), 1)).
// Other sizes (`Geometry`) are the nets of tests/peft_reference/generate_conv.py.

#include <d9d/nn/conv2d.h>
#include <d9d/nn/linear.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

namespace convnet {

/// Channels, kernels, strides, paddings, conv2's groups; `features` = conv2's outputs per sample.
struct Geometry {
  int64_t c0 = 3, c1 = 8, c2 = 8;
  int64_t k1 = 3, s1 = 1, p1 = 1;
  int64_t k2 = 3, s2 = 2, p2 = 0, g2 = 1;  // g2: conv2's groups
  int64_t features = 72;
};

template <typename Conv, typename Linear>
struct NetImpl : torch::nn::Module {
  explicit NetImpl(const Geometry& g = {})
      : conv1(register_module("conv1", Conv(torch::nn::Conv2dOptions(g.c0, g.c1, g.k1).stride(g.s1).padding(g.p1)))),
        conv2(register_module("conv2", Conv(torch::nn::Conv2dOptions(g.c1, g.c2, g.k2).stride(g.s2).padding(g.p2).groups(g.g2)))),
        head(register_module("head", Linear(g.features, 5))) {}

  torch::Tensor forward(const torch::Tensor& x) {
    return head(conv2(conv1(x).relu()).relu().flatten(1));
  }
  Conv conv1, conv2;
  Linear head;
};

/// The net on d9d's adaptable layers.
struct ConvNetImpl : NetImpl<d9d::nn::Conv2d, d9d::nn::Linear> {
  using NetImpl::NetImpl;
};
TORCH_MODULE(ConvNet);

/// The same net on LibTorch's own layers (a checkpoint of it loads into `ConvNet`).
struct TorchConvNetImpl : NetImpl<torch::nn::Conv2d, torch::nn::Linear> {
  using NetImpl::NetImpl;
};
TORCH_MODULE(TorchConvNet);

}  // namespace convnet
