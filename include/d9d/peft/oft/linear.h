#pragma once

#include <d9d/peft/adapter_set.h>
#include <d9d/peft/oft/math.h>
#include <d9d/peft/oft/options.h>
#include <d9d/peft/wrapped_linear.h>

#include <memory>
#include <string>

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

/// One named OFT adapter of a linear layer with `in_features` inputs: the
/// child `oft_R` (so its key is `oft_R.weight`, as in PEFT's files) and the
/// blocks resolved for this layer.
class OFTLinearAdapterImpl : public torch::nn::Module {
 public:
  OFTLinearAdapterImpl(int64_t in_features, const OFTParameters& options, const at::TensorOptions& like);
  const OFTParameters& options() const noexcept { return options_; }
  const oft::Blocks& blocks() const noexcept { return blocks_; }
  /// COFT's projection, written into the weight (no-op without `coft`), as
  /// PEFT does before each use.
  void project_() const;
  /// The `[r, b, b]` rotation blocks (the shared block repeated).
  at::Tensor rotation_blocks() const;
  /// The block-diagonal `[in, in]` rotation `R` (PEFT's `get_delta_weight`).
  at::Tensor rotation() const;
  void pretty_print(std::ostream& stream) const override;

  std::shared_ptr<OFTRotationImpl> oft_R;

 private:
  OFTParameters options_;
  oft::Blocks blocks_;
};

/// An OFT wrapper around a linear layer, as PEFT 0.21's `oft.Linear`: each
/// active adapter rotates the input in turn, block by block
/// (`x ← x · R`), and the base computes on the result. Merging writes
/// `(R @ Wᵀ)ᵀ` into the weight (the bias is not touched); unmerging applies
/// `R⁻¹`. `delta_weight` is what a merge adds, `W·Rᵀ - W`. Keys:
/// `base.weight`, `base.bias`, the first adapter's `oft_R.weight`, further
/// adapters under `adapters.<name>.`.
class OFTLinearImpl : public AdapterSetLayer<OFTLinearAdapterImpl>, public WrappedLinear {
 public:
  OFTLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const OFTParameters& options,
                const std::string& adapter_name = kDefaultAdapterName);
  OFTLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const OFTParameters& options,
                const std::string& adapter_name = kDefaultAdapterName);

  std::string peft_type() const override { return "OFT"; }
  at::Tensor forward(const at::Tensor& input) override;

  void add_adapter(const std::string& name, const AdapterOptions& options) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  at::Tensor delta_weight(const std::string& name) const override;
  torch::nn::AnyModule unwrap() override;
  void pretty_print(std::ostream& stream) const override;

  /// The first adapter's rotation parameters (the single-adapter layout).
  std::shared_ptr<OFTRotationImpl> oft_R;

 protected:
  void relayout() override;
  void describe(std::ostream& stream, const OFTLinearAdapterImpl& adapter) const override;
};

TORCH_MODULE(OFTLinear);

}  // namespace d9d::peft
