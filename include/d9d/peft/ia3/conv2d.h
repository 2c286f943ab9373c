#pragma once

#include <d9d/nn/conv2d.h>
#include <d9d/peft/adapter_set.h>
#include <d9d/peft/ia3/options.h>

#include <memory>
#include <string>

namespace d9d::peft {

/// One named (IA)³ adapter of a Conv2d layer: `ia3_l`, `[1, out, 1, 1]`, or
/// `[1, in, 1, 1]` on a feed-forward layer (PEFT's key and shape).
class IA3Conv2dAdapterImpl : public torch::nn::Module {
 public:
  IA3Conv2dAdapterImpl(int64_t channels, const IA3Parameters& options, const at::TensorOptions& like);
  const IA3Parameters& options() const noexcept { return options_; }
  void pretty_print(std::ostream& stream) const override;

  at::Tensor ia3_l;

 private:
  IA3Parameters options_;
};

/// An (IA)³ wrapper around a `d9d::nn::Conv2d`, as PEFT's `ia3.Conv2d`:
/// `base(x) * l` per output channel (the bias scaled too), or on a
/// feed-forward layer `base(x * l)` per input channel; several active
/// adapters multiply their vectors. Every Conv2d is adaptable: grouped,
/// dilated, any padding mode (the scaling commutes with the padding).
///
/// Merging multiplies the weight's output channels (and the bias) by `l`, or
/// on a feed-forward layer its input channels, each group's slice of `l` for
/// that group's filters; unmerging divides by `l + 1e-8`, as PEFT does.
///
/// Keys: `base.weight`, `base.bias`, the first adapter's `ia3_l`, further
/// adapters under `adapters.<name>.ia3_l`. Whether the layer is feed-forward
/// is fixed by its first adapter; every adapter agrees.
class IA3Conv2dImpl : public AdapterSetLayer<IA3Conv2dAdapterImpl> {
 public:
  /// Wraps `base` with one adapter, `adapter_name`, active.
  IA3Conv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base, const IA3Parameters& options,
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

  std::shared_ptr<d9d::nn::Conv2dImpl> base;
  /// The first adapter's vector (the single-adapter layout).
  at::Tensor ia3_l;

 protected:
  void relayout() override;
  void describe(std::ostream& stream, const IA3Conv2dAdapterImpl& adapter) const override;

 private:
  bool feedforward_ = false;
};

TORCH_MODULE(IA3Conv2d);

}  // namespace d9d::peft
