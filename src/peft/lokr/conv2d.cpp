// The LoKr wrapper around a Conv2d layer, as PEFT's lokr.Conv2d.
#include <d9d/peft/lokr/conv2d.h>

namespace d9d::peft {

LoKrConv2dImpl::LoKrConv2dImpl(std::shared_ptr<d9d::nn::Conv2dImpl> base, const LoKrParameters& options,
                               const std::string& adapter_name)
    : DeltaConv2d(std::move(base), "LoKr") {
  add_adapter(adapter_name, options);
  set_active_adapters({adapter_name});
}

void LoKrConv2dImpl::pretty_print(std::ostream& stream) const { print_adapters(stream, "d9d::peft::LoKrConv2d"); }

}  // namespace d9d::peft
