#pragma once

#include <d9d/nn/adaptable.h>
#include <d9d/nn/embedding.h>
#include <d9d/nn/linear.h>
#include <d9d/peft/base.h>
#include <d9d/peft/lora/config.h>

#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace d9d::peft {

/// How fresh adapter weights start.
enum class LoRAInit {
  /// A kaiming-uniform(a = sqrt(5)), B zeros (embeddings: A zeros, B normal):
  /// the adapter starts as a no-op.
  Default,
  /// A normal(0, 1/r), B zeros (embeddings as Default). PEFT's "gaussian".
  Gaussian,
  /// Neither is zeroed (PEFT's `init_lora_weights=false`); for tests.
  Random,
};

/// Everything one LoRA layer needs: the d9d parameters plus the Hugging Face
/// PEFT variants.
struct LoRALayerOptions {
  int64_t r = 8;
  double alpha = 16;
  double dropout = 0.0;
  /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
  bool use_rslora = false;
  /// DoRA (linear layers only): a learned magnitude per output row.
  bool use_dora = false;
  LoRAInit init = LoRAInit::Default;

  LoRALayerOptions() = default;
  LoRALayerOptions(int64_t r_, double alpha_, double dropout_ = 0.0) : r(r_), alpha(alpha_), dropout(dropout_) {}
  LoRALayerOptions(const LoRAParameters& p)  // NOLINT: the d9d parameters are the common case
      : r(p.r), alpha(static_cast<double>(p.alpha)), dropout(p.dropout) {}
  double scale() const;
  /// Throws `ConfigError` for r < 1, alpha <= 0 or dropout outside [0, 1).
  void validate() const;
};

/// The name an adapter gets when none is given (PEFT's too).
inline const std::string kDefaultAdapterName = "default";

/// Throws `PeftError` unless `name` is a usable adapter name: non-empty,
/// letters, digits, `_` and `-` only (it becomes part of state-dict keys).
void validate_adapter_name(const std::string& name);

/// One named LoRA adapter of a linear layer: `lora_A` `[r, in]`, `lora_B`
/// `[out, r]`, `dropout`, and with DoRA `lora_magnitude_vector` `[out]`.
/// Its parameter names are PEFT's file keys relative to the layer.
class LoRALinearAdapterImpl : public torch::nn::Module {
 public:
  LoRALinearAdapterImpl(int64_t in_features, int64_t out_features, const LoRALayerOptions& options,
                        const at::TensorOptions& like);

  const LoRALayerOptions& options() const noexcept { return options_; }
  double scale() const noexcept { return scale_; }
  void pretty_print(std::ostream& stream) const override;

  torch::nn::Linear lora_A{nullptr};
  torch::nn::Linear lora_B{nullptr};
  torch::nn::Dropout dropout{nullptr};
  /// DoRA only: `[out]`.
  at::Tensor lora_magnitude_vector;

 private:
  LoRALayerOptions options_;
  double scale_;
};

/// One named LoRA adapter of an embedding, laid out as PEFT does:
/// `lora_embedding_A` `[r, num_embeddings]`, `lora_embedding_B` `[dim, r]`.
class LoRAEmbeddingAdapterImpl : public torch::nn::Module {
 public:
  LoRAEmbeddingAdapterImpl(int64_t num_embeddings, int64_t dim, const LoRALayerOptions& options,
                           const at::TensorOptions& like);

  const LoRALayerOptions& options() const noexcept { return options_; }
  double scale() const noexcept { return scale_; }
  void pretty_print(std::ostream& stream) const override;

  at::Tensor lora_embedding_A;
  at::Tensor lora_embedding_B;
  /// DoRA only: the magnitude of each embedding dimension, `[embedding_dim]`.
  at::Tensor lora_magnitude_vector;

 private:
  LoRALayerOptions options_;
  double scale_;
};

/// The named adapters of one LoRA layer: their order, which are active, and
/// whether adapters are enabled at all. Shared by the linear and embedding
/// wrappers (defined for `LoRALinearAdapterImpl` and `LoRAEmbeddingAdapterImpl`).
template <typename Adapter>
class AdapterSet {
 public:
  using Entry = std::pair<std::string, std::shared_ptr<Adapter>>;

  const std::vector<Entry>& entries() const noexcept { return entries_; }
  std::vector<std::string> names() const;
  /// The adapter `name`, or null.
  std::shared_ptr<Adapter> find(const std::string& name) const;
  /// The adapter `name` (`PeftError` naming the ones held if absent).
  Adapter& adapter(const std::string& name) const;
  const std::vector<std::string>& active() const noexcept { return active_; }
  /// Activates the adapters of `names` this layer holds (others are ignored)
  /// and deactivates the rest; only active adapters' weights require grad.
  void set_active_adapters(const std::vector<std::string>& names);
  bool enabled() const noexcept { return enabled_; }
  /// With adapters disabled the layer computes its base alone.
  void set_adapters_enabled(bool enabled) noexcept { enabled_ = enabled; }

 protected:
  /// `name`'s adapter; the first one for an empty name.
  Adapter& pick(const std::string& name) const;
  /// Appends an inactive, frozen adapter (`PeftError` if the name is taken or unusable).
  void append(const std::string& name, std::shared_ptr<Adapter> adapter);
  /// Removes `name` (`PeftError` if absent).
  void remove(const std::string& name);
  /// Every adapter's parameter keys relative to the wrapper: the first
  /// adapter's as they are, the others' under `adapters.<name>.`.
  std::vector<std::string> adapter_state_keys() const;
  /// The second and later adapters as a `ModuleDict`, or null if there are none.
  std::shared_ptr<torch::nn::Module> further_adapters() const;

  std::vector<Entry> entries_;
  std::vector<std::string> active_;
  bool enabled_ = true;
};

/// A LoRA wrapper around a linear layer:
/// `base(x) + sum over active adapters of scale * lora_B(lora_A(dropout(x)))`,
/// `scale = alpha / r` (`alpha / sqrt(r)` with rsLoRA). A DoRA adapter
/// rescales per output row: `m / ||W + scale * B A||_row * (W + scale * B A) x + bias`,
/// the norm detached from the graph as PEFT does.
///
/// Keys: the base is `base` (`base.weight`, `base.bias`). The first adapter
/// sits directly on the wrapper (`lora_A.weight` `[r, in]`, `lora_B.weight`
/// `[out, r]`, DoRA's `lora_magnitude_vector` `[out]`), so a model with one
/// LoRA keeps d9d's keys; every further adapter `name` sits under
/// `adapters.<name>.` (`adapters.<name>.lora_A.weight`, ...). Deleting the first
/// adapter moves the next one to the top.
///
/// Adapters are created on the base weight's device and dtype. The base is a
/// `d9d::nn::Linear` (its calls are routed here) or a `torch::nn::Linear` held
/// by a `Sequential`, `ModuleList` or `ModuleDict`.
class LoRALinearImpl : public torch::nn::Module,
                       public d9d::nn::LayerOverride,
                       public AdapterLayer,
                       public AdapterSet<LoRALinearAdapterImpl> {
 public:
  /// Wraps `base` with one adapter, `adapter_name`, active.
  LoRALinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoRALayerOptions& options,
                 const std::string& adapter_name = kDefaultAdapterName);
  LoRALinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoRALayerOptions& options,
                 const std::string& adapter_name = kDefaultAdapterName);

  at::Tensor forward(const at::Tensor& input) override;

  /// Adds an inactive adapter (`PeftError` if the name is taken).
  void add_adapter(const std::string& name, const LoRALayerOptions& options);
  /// Removes an adapter; its weights leave the wrapper, nothing is merged.
  void delete_adapter(const std::string& name);

  /// Re-initialises every adapter as its options say (and DoRA's magnitude
  /// from the current weights).
  void reset_parameters();
  /// DoRA: sets the magnitude to `||W + scale * B A||_row` of the current
  /// weights. Called at construction; call it again after loading base
  /// weights into a model injected before loading. Empty name: the first adapter.
  void reset_magnitude(const std::string& name = {});

  /// Folds adapter `name` (empty: the first) into the base weight in place
  /// (DoRA: `W' = m / ||W + sBA||_row * (W + sBA)`); the adapter stays.
  void merge_into_base(const std::string& name = {});
  /// The weight delta merging adapter `name` would add, `scale * B @ A` (not for DoRA).
  at::Tensor delta_weight(const std::string& name = {}) const;

  /// The first adapter's scale and options.
  double scale() const { return first().scale(); }
  const LoRALayerOptions& options() const { return first().options(); }
  std::shared_ptr<torch::nn::Module> base() const;
  const at::Tensor& base_weight() const;
  const at::Tensor& base_bias() const;

  std::vector<std::string> fresh_state_keys() const override { return adapter_state_keys(); }
  void pretty_print(std::ostream& stream) const override;

  /// The first adapter's modules (the single-adapter layout).
  torch::nn::Linear lora_A{nullptr};
  torch::nn::Linear lora_B{nullptr};
  torch::nn::Dropout dropout{nullptr};
  /// DoRA only: `[out]`.
  at::Tensor lora_magnitude_vector;

  // Which kind of base this wraps; exactly one is set.
  std::shared_ptr<d9d::nn::LinearImpl> d9d_base;
  std::shared_ptr<torch::nn::LinearImpl> torch_base;

 private:
  void init(const LoRALayerOptions& options, const std::string& adapter_name);
  void reset_adapter(LoRALinearAdapterImpl& adapter);
  void reset_magnitude(LoRALinearAdapterImpl& adapter);
  /// Registers the adapters as the key layout above says.
  void relayout();
  const LoRALinearAdapterImpl& first() const { return pick({}); }
  at::Tensor dora_scale(const LoRALinearAdapterImpl& adapter) const;
  at::Tensor forward_general(const at::Tensor& input);
};

TORCH_MODULE(LoRALinear);

/// A LoRA wrapper around a `d9d::nn::Embedding`, laid out as PEFT does:
/// forward `base(ids) + sum over active adapters of scale * embedding(ids, A^T) @ B^T`;
/// merge `W += scale * (B @ A)^T`. Keys as `LoRALinearImpl`: the first
/// adapter's `lora_embedding_A`/`lora_embedding_B` on the wrapper, further
/// ones under `adapters.<name>.`.
class LoRAEmbeddingImpl : public torch::nn::Module,
                          public d9d::nn::LayerOverride,
                          public AdapterLayer,
                          public AdapterSet<LoRAEmbeddingAdapterImpl> {
 public:
  LoRAEmbeddingImpl(std::shared_ptr<d9d::nn::EmbeddingImpl> base, const LoRALayerOptions& options,
                    const std::string& adapter_name = kDefaultAdapterName);

  at::Tensor forward(const at::Tensor& indices) override;

  void add_adapter(const std::string& name, const LoRALayerOptions& options);
  void delete_adapter(const std::string& name);

  void reset_parameters();
  /// DoRA: sets adapter `name`'s magnitude to the column norms of the weight
  /// with its delta added (as at creation); call it after loading base weights
  /// into a freshly injected DoRA adapter.
  void reset_magnitude(const std::string& name = {});
  void merge_into_base(const std::string& name = {});
  at::Tensor delta_weight(const std::string& name = {}) const;

  double scale() const { return first().scale(); }
  const LoRALayerOptions& options() const { return first().options(); }

  std::vector<std::string> fresh_state_keys() const override { return adapter_state_keys(); }
  void pretty_print(std::ostream& stream) const override;

  std::shared_ptr<d9d::nn::EmbeddingImpl> base;
  /// The first adapter's weights.
  at::Tensor lora_embedding_A;
  at::Tensor lora_embedding_B;
  /// The first adapter's DoRA magnitude (undefined without DoRA).
  at::Tensor lora_magnitude_vector;

 private:
  void reset_adapter(LoRAEmbeddingAdapterImpl& adapter);
  void reset_magnitude(LoRAEmbeddingAdapterImpl& adapter);
  at::Tensor dora_norm(const LoRAEmbeddingAdapterImpl& adapter) const;
  void relayout();
  const LoRAEmbeddingAdapterImpl& first() const { return pick({}); }
};

TORCH_MODULE(LoRAEmbedding);

}  // namespace d9d::peft
