// The LoKr wrapper around a linear layer.
#include <d9d/peft/detail/delta_layer_impl.h>
#include <d9d/peft/lokr/linear.h>

namespace d9d::peft {

template class DeltaLinear<LoKrLayerImpl>;

LoKrLinearImpl::LoKrLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoKrParameters& options,
                               const std::string& adapter_name)
    : DeltaLinear(std::move(base)) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

LoKrLinearImpl::LoKrLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoKrParameters& options,
                               const std::string& adapter_name)
    : DeltaLinear(std::move(base)) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void LoKrLinearImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoKrLinear"); }

}  // namespace d9d::peft
