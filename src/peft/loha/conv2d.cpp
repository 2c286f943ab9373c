// The LoHa wrapper around a Conv2d layer, as PEFT's loha.Conv2d.
#include <d9d/peft/loha/conv2d.h>

namespace d9d::peft {

LoHaConv2dImpl::LoHaConv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base, const LoHaParameters& options,
                               const std::string& adapter_name)
    : DeltaConv2d(std::move(base), "LoHa") {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void LoHaConv2dImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoHaConv2d"); }

}  // namespace d9d::peft
