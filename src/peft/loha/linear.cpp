// The LoHa wrapper around a linear layer.
#include <d9d/peft/detail/delta_layer_impl.h>
#include <d9d/peft/loha/linear.h>

namespace d9d::peft {

template class DeltaLinear<LoHaLayerImpl>;

LoHaLinearImpl::LoHaLinearImpl(std::shared_ptr<d9d::nn::LinearImpl> base, const LoHaParameters& options,
                               const std::string& adapter_name)
    : DeltaLinear(std::move(base)) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

LoHaLinearImpl::LoHaLinearImpl(std::shared_ptr<torch::nn::LinearImpl> base, const LoHaParameters& options,
                               const std::string& adapter_name)
    : DeltaLinear(std::move(base)) {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void LoHaLinearImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoHaLinear"); }

}  // namespace d9d::peft
