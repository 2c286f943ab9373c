#pragma once

#include <d9d/peft/adapter_set.h>
#include <d9d/peft/ia3/options.h>

#include <ATen/core/Tensor.h>

#include <ostream>
#include <string>
#include <vector>

namespace d9d::peft {

/// One named (IA)³ adapter: its vector `ia3_l` (PEFT's key relative to the
/// layer), in the layout of the layer it scales: `[out, 1]` or `[1, in]` on a
/// linear layer, `[1, channels, 1, 1]` on a Conv2d.
class IA3AdapterImpl : public torch::nn::Module {
 public:
  /// Ones, or with `init_ones(false)` a normal draw (PEFT's `init_ia3_weights`).
  IA3AdapterImpl(const std::vector<int64_t>& shape, const IA3Parameters& options, const at::TensorOptions& like);
  const IA3Parameters& options() const noexcept { return options_; }
  void pretty_print(std::ostream& stream) const override;

  at::Tensor ia3_l;

 private:
  IA3Parameters options_;
};

/// What every (IA)³ layer shares (`IA3LinearImpl`, `IA3Conv2dImpl`): the
/// adapters' vectors, whether the layer scales its input (feed-forward) or
/// its output, fixed by the first adapter and kept by every further one, the
/// product of the active vectors, and the key layout (the first adapter's
/// `ia3_l` on the layer, further ones under `adapters.<name>.ia3_l`). A layer
/// type adds its forward, merge, unmerge and unwrap.
class IA3LayerImpl : public AdapterSetLayer<IA3AdapterImpl> {
 public:
  std::string peft_type() const override { return "IA3"; }
  /// `PeftError` for options that are not `IA3Parameters` or that disagree
  /// with the layer on `feedforward`.
  void add_adapter(const std::string& name, const AdapterOptions& options) override;
  /// (IA)³ scales; its merge is not a sum: `PeftError`.
  at::Tensor delta_weight(const std::string& name) const override;

  bool feedforward() const noexcept { return feedforward_; }
  /// The first adapter's vector (the single-adapter layout).
  at::Tensor ia3_l;

 protected:
  explicit IA3LayerImpl(bool feedforward) : feedforward_(feedforward) {}
  /// The shape of this layer's vectors, and the options of its weight.
  virtual std::vector<int64_t> vector_shape() const = 0;
  virtual at::TensorOptions weight_options() const = 0;
  /// The product of the active, unmerged adapters' vectors (undefined: none,
  /// or adapters disabled).
  at::Tensor active_scaling() const;
  void relayout() override;
  void describe(std::ostream& stream, const IA3AdapterImpl& adapter) const override;

  bool feedforward_ = false;
};

}  // namespace d9d::peft
