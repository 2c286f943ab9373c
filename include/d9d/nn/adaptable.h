#pragma once

#include <ATen/core/Tensor.h>

#include <memory>

namespace d9d::nn {

/// Receives the calls made to an adaptable layer while a PEFT wrapper holds it.
///
/// PEFT wrappers (for example `d9d::peft::LoRALinearImpl`) implement this and
/// install themselves on the layer they wrap, so that a parent calling the
/// layer through its own typed member reaches the wrapper.
class LayerOverride {
 public:
  virtual ~LayerOverride() = default;
  virtual at::Tensor forward(const at::Tensor& input) = 0;
};

/// Mixin of the `d9d::nn` layers: the part that lets a PEFT wrapper take over
/// their calls.
///
/// LibTorch's `replace_module` only changes the module registry; a parent that
/// calls `q_proj->forward(x)` through its own member still reaches the old
/// object. A layer with this mixin forwards those calls to the wrapper that
/// holds it, so the module tree and the call path stay in step.
class Adaptable {
 public:
  Adaptable() = default;
  /// Copies (as made by `clone()`) start without an override: the clone is a
  /// plain layer, not a second entry point into the original's wrapper.
  Adaptable(const Adaptable&) : Adaptable() {}
  Adaptable& operator=(const Adaptable&) {
    override_.reset();
    has_override_ = false;
    return *this;
  }
  virtual ~Adaptable() = default;

  /// Routes every later `forward` call to `target` (held weakly: the module
  /// tree owns the wrapper).
  void set_override(const std::shared_ptr<LayerOverride>& target) {
    override_ = target;
    has_override_ = target != nullptr;
  }
  void clear_override() {
    override_.reset();
    has_override_ = false;
  }
  bool has_override() const { return has_override_; }

 protected:
  /// The wrapper that takes this layer's calls, or null. Throws
  /// `d9d::peft::PeftError` if a wrapper was installed and has since been
  /// destroyed without being merged.
  std::shared_ptr<LayerOverride> override_target() const;

 private:
  std::weak_ptr<LayerOverride> override_;
  bool has_override_ = false;
};

}  // namespace d9d::nn
