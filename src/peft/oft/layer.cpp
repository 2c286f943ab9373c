// What the OFT layers share: the rotation parameters, the adapter's blocks
// and rotation, merging into the weight seen as [out, features], the key
// layout.
#include <d9d/peft/detail/adapter_set_impl.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/oft/layer.h>

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>

namespace d9d::peft {

OFTRotationImpl::OFTRotationImpl(const std::vector<int64_t>& shape, const at::TensorOptions& like) {
  weight = register_parameter("weight", at::zeros(shape, like));
}

void OFTRotationImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::OFTRotation(" << weight.size(0) << ", " << weight.size(1) << ")";
}

OFTAdapterImpl::OFTAdapterImpl(int64_t features, const OFTParameters& options, const at::TensorOptions& like)
    : options_(options), blocks_(oft::resolve(features, options.r(), options.oft_block_size())) {
  if (options.r() == 0 ? blocks_.block_size != options.oft_block_size() : blocks_.r != options.r()) {
    // PEFT adjusts silently but for a warning; so does this port, for the same files.
    TORCH_WARN("OFT: ", options.r() == 0 ? "oft_block_size " : "r ",
               options.r() == 0 ? options.oft_block_size() : options.r(), " does not divide the layer's ", features,
               " rotated features; adjusted to r = ", blocks_.r, ", oft_block_size = ", blocks_.block_size,
               " as PEFT does");
  }
  oft_R = register_module("oft_R", std::make_shared<OFTRotationImpl>(oft::weight_shape(blocks_, options.block_share()), like));
  if (!options.init_weights()) {
    // PEFT's reset_oft_parameters with init_weights=False: N(0, 0.1).
    torch::NoGradGuard no_grad;
    oft_R->weight.normal_(0.0, 0.1);
  }
}

void OFTAdapterImpl::project_() const {
  if (!options_.coft()) return;
  torch::NoGradGuard no_grad;
  oft_R->weight.copy_(oft::project(oft_R->weight, blocks_.block_size, options_.eps()));
}

at::Tensor OFTAdapterImpl::rotation_blocks() const {
  project_();
  const at::Tensor blocks = oft::cayley(oft_R->weight, blocks_.block_size, options_.use_cayley_neumann(),
                                        options_.num_cayley_neumann_terms());
  return oft::expand_blocks(blocks, blocks_.r);
}

at::Tensor OFTAdapterImpl::rotation() const {
  const auto dtype = oft_R->weight.scalar_type();
  // PEFT builds a half-precision rotation on the CPU in float32, then casts back.
  if (oft_R->weight.device().is_cpu() && (dtype == at::kHalf || dtype == at::kBFloat16)) {
    project_();
    const at::Tensor w = oft_R->weight.to(at::kFloat);
    const at::Tensor blocks = oft::cayley(w, blocks_.block_size, options_.use_cayley_neumann(),
                                          options_.num_cayley_neumann_terms());
    return oft::block_diagonal(oft::expand_blocks(blocks, blocks_.r)).to(dtype);
  }
  return oft::block_diagonal(rotation_blocks());
}

void OFTAdapterImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::peft::OFTAdapter(r=" << blocks_.r << ", oft_block_size=" << blocks_.block_size << ")";
}

void OFTLayerImpl::add_adapter(const std::string& name, const AdapterOptions& options) {
  const auto* o = dynamic_cast<const OFTParameters*>(&options);
  if (!o) throw PeftError("add_adapter: an OFT layer takes OFTParameters as the adapter's options");
  o->validate("add_adapter(\"" + name + "\")");
  const at::Tensor& w = adapted_weight();
  append(name, std::make_shared<OFTAdapterImpl>(w.numel() / w.size(0), *o, w.options()));
}

void OFTLayerImpl::relayout() {
  if (named_children().contains("oft_R")) unregister_module("oft_R");
  clear_further_adapters();
  oft_R = nullptr;
  if (entries_.empty()) return;
  oft_R = register_module("oft_R", entries_.front().second->oft_R);
  register_further_adapters();
}

at::Tensor OFTLayerImpl::delta_weight(const std::string& name) const {
  torch::NoGradGuard no_grad;
  const at::Tensor& w = adapted_weight();
  return oft::merged_weight(w, adapter(name).rotation()) - w;
}

void OFTLayerImpl::merge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = require_merged(name, false, "merge_adapter");
  adapted_weight().copy_(oft::merged_weight(adapted_weight(), a.rotation()));
  set_merged(name, true);
}

void OFTLayerImpl::unmerge_adapter(const std::string& name) {
  torch::NoGradGuard no_grad;
  const auto& a = require_merged(name, true, "unmerge_adapter");
  adapted_weight().copy_(oft::unmerged_weight(adapted_weight(), a.rotation()));
  set_merged(name, false);
}

void OFTLayerImpl::describe(std::ostream& stream, const OFTAdapterImpl& adapter) const {
  stream << "r=" << adapter.blocks().r << ", oft_block_size=" << adapter.blocks().block_size;
  if (adapter.options().coft()) stream << ", coft";
  if (adapter.options().block_share()) stream << ", block_share";
}

template class AdapterSetLayer<OFTAdapterImpl>;

}  // namespace d9d::peft
