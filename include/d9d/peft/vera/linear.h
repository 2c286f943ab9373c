#pragma once

#include <d9d/peft/adapter_set.h>
#include <d9d/peft/shared_state.h>
#include <d9d/peft/vera/options.h>
#include <d9d/peft/wrapped_linear.h>

#include <memory>
#include <string>
#include <vector>

namespace d9d::peft {

/// One named VeRA adapter of a linear layer `[out, in]`: the trained vectors
/// `vera_lambda_b` `[out]` and `vera_lambda_d` `[r]` (its parameters; PEFT's
/// keys relative to the layer), and the adapter's frozen projections `vera_A`
/// `[r, max_in]`, `vera_B` `[max_out, r]`: the same tensors in every layer of
/// the adapter, sliced to `[r, in]` and `[out, r]` when used (the layer
/// registers them as buffers).
class VeraLinearAdapterImpl : public torch::nn::Module {
 public:
  /// Takes `options.vera_A()`/`vera_B()` where given (`PeftError` if they do
  /// not fit `[r, >= in]`, `[>= out, r]`), else draws its own sized
  /// `[r, in]`, `[out, r]` from `projection_prng_key`.
  VeraLinearAdapterImpl(int64_t in_features, int64_t out_features, const VeraParameters& options,
                        const at::TensorOptions& like);
  const VeraParameters& options() const noexcept { return options_; }
  /// `(λ_b ⊙ B[:out, :]) @ (λ_d ⊙ A[:, :in])`.
  at::Tensor delta_weight() const;
  void pretty_print(std::ostream& stream) const override;

  at::Tensor vera_lambda_b, vera_lambda_d;
  at::Tensor vera_A, vera_B;

 private:
  VeraParameters options_;
  int64_t in_features_;
};

/// A VeRA wrapper around a linear layer, as PEFT's `vera.Linear`: each active
/// adapter adds `λ_b ⊙ linear(λ_d ⊙ linear(dropout(x), A[:, :in]), B[:out, :])`
/// to `base(x)` (dropout in training only, from LibTorch's default
/// generator). Merging adds `ΔW` to the weight (the bias is not touched).
/// Keys: `base.weight`, `base.bias`, the first adapter's `vera_lambda_b`,
/// `vera_lambda_d`, further adapters' under `adapters.<name>.`, and every
/// adapter's projections as buffers `vera_A.<name>`, `vera_B.<name>` (PEFT's
/// in-model layout). Only the λ vectors are parameters, so only they train;
/// PEFT's files hold the projections once for the model, not per layer
/// (`shared_adapter_state`).
class VeraLinearImpl : public AdapterSetLayer<VeraLinearAdapterImpl>, public WrappedLinear, public SharesAdapterState {
 public:
  VeraLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const VeraParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);
  VeraLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const VeraParameters& options,
                 const std::string& adapter_name = kDefaultAdapterName);

  std::string peft_type() const override { return "VERA"; }
  at::Tensor forward(const at::Tensor& input) override;

  void add_adapter(const std::string& name, const AdapterOptions& options) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  at::Tensor delta_weight(const std::string& name) const override;
  torch::nn::AnyModule unwrap() override;
  /// The λ vectors and the projection buffers (no base checkpoint holds either).
  std::vector<std::string> fresh_state_keys() const override;
  /// `vera_A` and `vera_B`, in files unless the adapter's `save_projection` is false.
  std::vector<SharedAdapterState> shared_adapter_state(const std::string& name) const override;
  void pretty_print(std::ostream& stream) const override;

  /// The first adapter's vectors and projections (the single-adapter layout).
  at::Tensor vera_lambda_b, vera_lambda_d, vera_A, vera_B;

 protected:
  void relayout() override;
  void describe(std::ostream& stream, const VeraLinearAdapterImpl& adapter) const override;
};

TORCH_MODULE(VeraLinear);

}  // namespace d9d::peft
