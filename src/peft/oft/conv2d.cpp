// The OFT wrapper around a Conv2d layer: PEFT 0.21's oft.Conv2d merged model.
#include <d9d/peft/errors.h>
#include <d9d/peft/oft/conv2d.h>

#include <fmt/format.h>

#include <vector>

namespace d9d::peft {

std::string oft_conv2d_refusal(const std::string& name, const torch::nn::Conv2dOptions& o) {
  const auto& k = *o.kernel_size();
  const auto& d = *o.dilation();
  if (o.groups() != 1) {
    return fmt::format("OFT: '{}' is a Conv2d with groups = {}; PEFT's oft.Conv2d rotates a filter as [out, in·k·k], "
                       "which a grouped weight [out, in/groups, k, k] is not, so PEFT cannot merge it. OFT adapts "
                       "Conv2d layers with groups = 1 only; narrow the targets to exclude it",
                       name, o.groups());
  }
  if (d[0] != 1 || d[1] != 1) {
    return fmt::format("OFT: '{}' is a Conv2d with dilation ({}, {}); PEFT's oft.Conv2d refuses dilation > 1. Narrow "
                       "the targets to exclude it",
                       name, d[0], d[1]);
  }
  if (k[0] != k[1]) {
    return fmt::format("OFT: '{}' is a Conv2d with a {}x{} kernel; PEFT's oft.Conv2d sizes the rotation as "
                       "in·kernel[0]², so it can neither run nor load an adapter for a kernel that is not square. "
                       "Narrow the targets to exclude it",
                       name, k[0], k[1]);
  }
  return {};
}

OFTConv2dImpl::OFTConv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base_, const OFTParameters& options,
                             const std::string& adapter_name)
    : base(std::move(base_)) {
  if (!base) throw PeftError("OFTConv2dImpl: the base layer is null");
  if (std::string why = oft_conv2d_refusal("the base layer", base->options); !why.empty()) throw PeftError(why);
  register_module("base", base);
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

at::Tensor OFTConv2dImpl::forward(const at::Tensor& input) {
  std::vector<const OFTAdapterImpl*> rotating;
  if (enabled_) {
    for (const auto& name : active_) {
      if (!is_merged(name)) rotating.push_back(&adapter(name));
    }
  }
  if (rotating.empty()) return base->forward_base(input);
  // The input's patches would be rotated x ← x·R_1·R_2···, so each filter f
  // becomes f·R_n^T···R_1^T: the last active adapter's rotation applies first.
  const at::Tensor& w = base->weight;
  at::Tensor filters = w.reshape({w.size(0), -1});
  for (auto it = rotating.rbegin(); it != rotating.rend(); ++it) {
    const at::Tensor blocks = (*it)->rotation_blocks();
    filters = oft::rotate(filters.to(blocks.scalar_type()), blocks.transpose(-2, -1));
  }
  return base->convolve(input, filters.reshape(w.sizes()).to(w.scalar_type()), base->bias);
}

torch::nn::AnyModule OFTConv2dImpl::unwrap() {
  base->clear_override();
  return torch::nn::AnyModule(base);
}

void OFTConv2dImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::OFTConv2d"); }

}  // namespace d9d::peft
