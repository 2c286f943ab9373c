#pragma once

#include <d9d/peft/adapter_set.h>
#include <d9d/peft/ia3/options.h>
#include <d9d/peft/wrapped_linear.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// One named (IA)³ adapter of a linear layer: `ia3_l`, `[out, 1]`, or
/// `[1, in]` on a feed-forward layer (PEFT's key relative to the layer).
class IA3LinearAdapterImpl : public torch::nn::Module {
 public:
  IA3LinearAdapterImpl(int64_t in_features, int64_t out_features, const IA3Parameters& options,
                       const at::TensorOptions& like);
  const IA3Parameters& options() const noexcept { return options_; }
  void pretty_print(std::ostream& stream) const override;

  at::Tensor ia3_l;

 private:
  IA3Parameters options_;
};

/// An (IA)³ wrapper around a linear layer, as PEFT's `ia3.Linear`:
/// `base(x) * l` (the bias scaled too), or on a feed-forward layer
/// `base(x * l)`; several active adapters multiply their vectors. Merging
/// multiplies the weight's rows (columns on a feed-forward layer) and the bias
/// by `l`. Keys: `base.weight`, `base.bias`, the first adapter's `ia3_l`,
/// further adapters under `adapters.<name>.ia3_l`. Whether the layer is
/// feed-forward is fixed by its first adapter; every adapter agrees.
class IA3LinearImpl : public AdapterSetLayer<IA3LinearAdapterImpl>, public WrappedLinear {
 public:
  IA3LinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const IA3Parameters& options,
                const std::string& adapter_name = kDefaultAdapterName);
  IA3LinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const IA3Parameters& options,
                const std::string& adapter_name = kDefaultAdapterName);

  std::string peft_type() const override { return "IA3"; }
  at::Tensor forward(const at::Tensor& input) override;

  void add_adapter(const std::string& name, const AdapterOptions& options) override;
  void merge_adapter(const std::string& name) override;
  void unmerge_adapter(const std::string& name) override;
  /// (IA)³ scales; its merge is not a sum: `PeftError`.
  at::Tensor delta_weight(const std::string& name) const override;
  torch::nn::AnyModule unwrap() override;
  void pretty_print(std::ostream& stream) const override;

  bool feedforward() const noexcept { return feedforward_; }
  /// The first adapter's vector (the single-adapter layout).
  at::Tensor ia3_l;

 protected:
  void relayout() override;
  void describe(std::ostream& stream, const IA3LinearAdapterImpl& adapter) const override;

 private:
  bool feedforward_ = false;
};

TORCH_MODULE(IA3Linear);

}  // namespace d9d::peft
