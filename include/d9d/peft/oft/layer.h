#pragma once

#include <d9d/peft/adapter_set.h>
#include <d9d/peft/oft/math.h>
#include <d9d/peft/oft/options.h>

#include <ATen/core/Tensor.h>

#include <memory>
#include <ostream>
#include <string>
#include <vector>

namespace d9d::peft {

/// PEFT's `OFTRotationModule` as far as its state goes: the parameter
/// `weight`, `[blocks, b(b-1)/2]`, each row one block's skew-symmetric
/// upper triangle (`block_share`: one row for every block).
class OFTRotationImpl : public torch::nn::Module {
 public:
  OFTRotationImpl(const std::vector<int64_t>& shape, const at::TensorOptions& like);
  void pretty_print(std::ostream& stream) const override;
  at::Tensor weight;
};

/// One named OFT adapter of a layer whose rotated dimension is `features`
/// (a linear layer's `in`, a Conv2d's `in·kh·kw`): the child `oft_R` (so its
/// key is `oft_R.weight`, as in PEFT's files) and the blocks resolved for
/// this layer.
class OFTAdapterImpl : public torch::nn::Module {
 public:
  OFTAdapterImpl(int64_t features, const OFTParameters& options, const at::TensorOptions& like);
  const OFTParameters& options() const noexcept { return options_; }
  const oft::Blocks& blocks() const noexcept { return blocks_; }
  /// COFT's projection, written into the weight (no-op without `coft`), as
  /// PEFT does before each use.
  void project_() const;
  /// The `[r, b, b]` rotation blocks (the shared block repeated).
  at::Tensor rotation_blocks() const;
  /// The block-diagonal `[features, features]` rotation `R` (PEFT's `get_delta_weight`).
  at::Tensor rotation() const;
  void pretty_print(std::ostream& stream) const override;

  std::shared_ptr<OFTRotationImpl> oft_R;

 private:
  OFTParameters options_;
  oft::Blocks blocks_;
};

/// What every OFT layer shares (`OFTLinearImpl`, `OFTConv2dImpl`): the
/// adapters, merging `(R @ W_flatᵀ)ᵀ` into the weight seen as `[out,
/// features]` (a Conv2d's filters flattened, as PEFT's `weight.view(out,
/// in·k·k)`; the bias is not touched), unmerging with `R⁻¹`, `delta_weight`
/// (what a merge adds), and the key layout: `base.weight`, `base.bias`, the
/// first adapter's `oft_R.weight`, further adapters under `adapters.<name>.`.
/// A layer type adds its forward and unwrap.
class OFTLayerImpl : public AdapterSetLayer<OFTAdapterImpl> {
 public:
  std::string peft_type() const override { return "OFT"; }
  void add_adapter(const std::string& name, const AdapterOptions& options) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  at::Tensor delta_weight(const std::string& name) const override;

  /// The first adapter's rotation parameters (the single-adapter layout).
  std::shared_ptr<OFTRotationImpl> oft_R;

 protected:
  /// The base layer's weight, which merging changes in place.
  virtual const at::Tensor& adapted_weight() const = 0;
  void relayout() override;
  void describe(std::ostream& stream, const OFTAdapterImpl& adapter) const override;
};

}  // namespace d9d::peft
