// The LibTorch compatibility layer (include/d9d/detail/torch_compat.h), run
// against every LibTorch CI builds (Debian's 1.13 and the wheel's 2.x).
#include <d9d/detail/torch_compat.h>

#include <gtest/gtest.h>
#include <torch/nn/modules/linear.h>
#include <torch/utils.h>

namespace compat = d9d::detail::torch_compat;

TEST(TorchCompat, VersionIsOneSupported) {
  const bool supported = (compat::kTorchVersionMajor == 1 && compat::kTorchVersionMinor >= 13) ||
                         compat::kTorchVersionMajor == 2;
  EXPECT_TRUE(supported) << "LibTorch " << compat::kTorchVersionMajor << "." << compat::kTorchVersionMinor;
}

TEST(TorchCompat, CpuRandomFollowsManualSeed) {
  torch::manual_seed(1234);
  const uint64_t a1 = compat::draw_cpu_random64(), a2 = compat::draw_cpu_random64();
  torch::manual_seed(1234);
  EXPECT_EQ(compat::draw_cpu_random64(), a1);
  EXPECT_EQ(compat::draw_cpu_random64(), a2);
  EXPECT_NE(a1, a2);
  torch::manual_seed(4321);
  EXPECT_NE(compat::draw_cpu_random64(), a1);
  // The draw advances the same generator that tensor ops use.
  torch::manual_seed(7);
  const auto first = torch::rand({4});
  torch::manual_seed(7);
  compat::draw_cpu_random64();
  EXPECT_FALSE(torch::equal(torch::rand({4}), first));
}

TEST(TorchCompat, UnregisterParameterRemovesOnlyThatName) {
  torch::nn::Linear layer(3, 2);
  const at::Tensor extra = layer->register_parameter("extra", torch::ones({2}));
  ASSERT_TRUE(layer->named_parameters(false).contains("extra"));
  EXPECT_TRUE(compat::unregister_parameter(*layer, "extra"));
  EXPECT_FALSE(layer->named_parameters(false).contains("extra"));
  EXPECT_TRUE(layer->named_parameters(false).contains("weight"));
  EXPECT_TRUE(layer->named_parameters(false).contains("bias"));
  EXPECT_FALSE(compat::unregister_parameter(*layer, "extra"));
  EXPECT_FALSE(compat::unregister_parameter(*layer, "missing"));
  EXPECT_EQ(layer->parameters().size(), 2u);
}
