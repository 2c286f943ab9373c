#pragma once

#include <d9d/nn/conv2d.h>
#include <d9d/nn/linear.h>
#include <d9d/peft/hf/module_selector.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/inject.h>

#include <torch/nn/modules/linear.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>

namespace d9d::peft {

/// The `AdapterTargeting` of a method whose layers wrap linear layers chosen
/// by a Hugging Face PEFT config's `target_modules` (IA3, LoHa, LoKr, OFT,
/// VeRA): it adapts `d9d::nn::Linear`, and `torch::nn::Linear` inside
/// `Sequential`, `ModuleList` or `ModuleDict`, with `Layer`, constructible
/// from either layer's `shared_ptr`, the adapter's `Options` and its name.
/// `select(qualified_name)` gives the layer's `std::optional<Options>`
/// (nothing: leave it alone). A new method on linear layers is then
///
/// ```
/// PeftInjectionResult Foo::inject(torch::nn::Module& module) {
///   return inject_adapters(module, linear_targeting<FooLinearImpl, FooParameters>(
///       "Foo", "FOO", adapter_name_, config_.target_modules,
///       [this](const std::string& name) { return config_.select(name); }));
/// }
/// ```
template <typename Layer, typename Options, typename Select>
AdapterTargeting linear_targeting(std::string method, std::string peft_type, std::string adapter_name,
                                  const hf::ModuleSelector& target_modules, Select select) {
  AdapterTargeting t;
  t.method = std::move(method);
  t.peft_type = std::move(peft_type);
  t.adapter_name = std::move(adapter_name);
  t.what = "target_modules " + target_modules.describe();
  t.hint = "a target name matches a whole module name or its last dotted parts, a regex the whole name";
  t.adaptable = "d9d::nn::Linear, and torch::nn::Linear inside Sequential, ModuleList or ModuleDict";
  t.adapts = [](const torch::nn::Module& m) { return m.as<d9d::nn::LinearImpl>() || m.as<torch::nn::LinearImpl>(); };
  t.select = [select = std::move(select)](const std::string& name) -> std::shared_ptr<const AdapterOptions> {
    std::optional<Options> options = select(name);
    return options ? std::make_shared<const Options>(std::move(*options)) : nullptr;
  };
  t.wrap = [](const std::shared_ptr<torch::nn::Module>& m, const AdapterOptions& o,
              const std::string& name) -> torch::nn::AnyModule {
    const auto& options = static_cast<const Options&>(o);
    if (auto linear = std::dynamic_pointer_cast<d9d::nn::LinearImpl>(m)) {
      return torch::nn::AnyModule(std::make_shared<Layer>(linear, options, name));
    }
    if (auto plain = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)) {
      return torch::nn::AnyModule(std::make_shared<Layer>(plain, options, name));
    }
    return {};
  };
  return t;
}

/// `t`, which also adapts `d9d::nn::Conv2d` with `ConvLayer`, constructible
/// from a `shared_ptr<d9d::nn::Conv2dImpl>`, the adapter's `Options` and its
/// name (IA3, LoHa on Conv2d). `refusal(qualified_name, conv_options)`, if
/// given, says why a selected Conv2d cannot be adapted (empty: it can); it
/// is asked before any layer changes, and a reason becomes the `PeftError`:
///
/// ```
/// with_conv2d<FooConv2dImpl, FooParameters>(linear_targeting<FooLinearImpl, FooParameters>(...))
/// ```
template <typename ConvLayer, typename Options>
AdapterTargeting with_conv2d(
    AdapterTargeting t,
    std::function<std::string(const std::string& name, const torch::nn::Conv2dOptions& options)> refusal = {}) {
  if (refusal) {
    t.check = [check = std::move(t.check), refusal = std::move(refusal)](
                  const std::string& name, const torch::nn::Module& m, const AdapterOptions& o) {
      if (check) check(name, m, o);
      if (const auto* conv = m.as<d9d::nn::Conv2dImpl>()) {
        if (std::string why = refusal(name, conv->options); !why.empty()) throw PeftError(why);
      }
    };
  }
  t.adaptable = "d9d::nn::Linear, d9d::nn::Conv2d, and torch::nn::Linear inside Sequential, ModuleList or ModuleDict";
  t.adapts = [adapts = std::move(t.adapts)](const torch::nn::Module& m) {
    return m.as<d9d::nn::Conv2dImpl>() != nullptr || adapts(m);
  };
  t.wrap = [wrap = std::move(t.wrap)](const std::shared_ptr<torch::nn::Module>& m, const AdapterOptions& o,
                                      const std::string& name) -> torch::nn::AnyModule {
    if (auto conv = std::dynamic_pointer_cast<d9d::nn::Conv2dImpl>(m)) {
      return torch::nn::AnyModule(std::make_shared<ConvLayer>(conv, static_cast<const Options&>(o), name));
    }
    return wrap(m, o, name);
  };
  return t;
}

}  // namespace d9d::peft
