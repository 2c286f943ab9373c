// The grouped expert layer: options, checks, and the grouped product on the
// CPU (one matrix product per group) and on CUDA (at::_grouped_mm).
#include <d9d/nn/grouped_linear.h>
#include <d9d/peft/errors.h>

#include <ATen/Functions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/init.h>
#include <torch/version.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <string>

// at::_grouped_mm (with autograd) exists from LibTorch 2.9 on.
#if (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)) && \
    __has_include(<ATen/ops/_grouped_mm.h>)
#include <ATen/ops/_grouped_mm.h>
#define D9D_HAS_GROUPED_MM 1
#endif

namespace d9d::nn {

namespace {

std::string shape(at::IntArrayRef sizes) { return fmt::format("[{}]", fmt::join(sizes, ", ")); }

#ifdef D9D_HAS_GROUPED_MM
bool grouped_mm_on_cpu = false;  // detail::use_grouped_mm_on_cpu: tests without a GPU

/// Identity whose backward makes the gradient contiguous: _grouped_mm's
/// backward refuses an expanded one (stride 0, as `y.sum()` gives).
struct ContiguousGrad : public torch::autograd::Function<ContiguousGrad> {
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& x) { return x; }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    return {grads[0].contiguous()};
  }
};

/// Whether `at::_grouped_mm`'s fast kernel takes this call: bfloat16 on CUDA,
/// rows 16-byte aligned. The weight's gradient is a grouped product along the
/// tokens, whose groups must then start at 16-byte boundaries too.
bool grouped_mm_applies(const at::Tensor& input, const at::Tensor& weight, c10::ArrayRef<int64_t> sizes) {
  const bool device = input.is_cuda() || (grouped_mm_on_cpu && input.is_cpu());
  if (!device || input.scalar_type() != at::kBFloat16 || weight.scalar_type() != at::kBFloat16) return false;
  if (input.size(0) == 0 || !input.is_contiguous() || !weight.is_contiguous()) return false;
  constexpr int64_t kAlign = 8;  // elements of 2 bytes in 16 bytes
  if (weight.size(1) % kAlign != 0 || weight.size(2) % kAlign != 0) return false;
  for (const at::Tensor* t : {&input, &weight}) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  }
  if (torch::GradMode::is_enabled() && weight.requires_grad()) {
    for (const int64_t n : sizes) {
      if (n % kAlign != 0) return false;
    }
  }
  return true;
}

at::Tensor grouped_mm(const at::Tensor& input, const at::Tensor& weight, c10::ArrayRef<int64_t> sizes) {
  std::vector<int32_t> ends;
  ends.reserve(sizes.size());
  int64_t end = 0;
  for (const int64_t n : sizes) {
    end += n;
    ends.push_back(static_cast<int32_t>(end));
  }
  const at::Tensor offs =
      at::tensor(ends, at::TensorOptions().dtype(at::kInt)).to(input.device(), /*non_blocking=*/true);
  const at::Tensor out = at::_grouped_mm(input, weight, offs);
  return out.requires_grad() ? ContiguousGrad::apply(out) : out;
}
#endif

}  // namespace

namespace detail {
bool use_grouped_mm_on_cpu(bool on) {
#ifdef D9D_HAS_GROUPED_MM
  grouped_mm_on_cpu = on;
  return true;
#else
  (void)on;
  return false;
#endif
}
}  // namespace detail

at::Tensor grouped_linear(const at::Tensor& input, const at::Tensor& weight, c10::ArrayRef<int64_t> sizes) {
#ifdef D9D_HAS_GROUPED_MM
  if (grouped_mm_applies(input, weight, sizes)) return grouped_mm(input, weight, sizes);
#endif
  const int64_t groups = static_cast<int64_t>(sizes.size());
  const bool grad = torch::GradMode::is_enabled() && (input.requires_grad() || weight.requires_grad());
  if (!grad) {
    // Each group's product written straight into its rows of the output.
    at::Tensor out = at::empty({input.size(0), weight.size(2)}, input.options());
    int64_t begin = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t n = sizes[static_cast<size_t>(g)];
      if (n == 0) continue;
      at::Tensor rows = out.narrow(0, begin, n);
      at::mm_out(rows, input.narrow(0, begin, n), weight.select(0, g));
      begin += n;
    }
    return out;
  }
  // split and unbind are one autograd node each: backward assembles the
  // weight's gradient once, not one full-size zero tensor per group as
  // G separate select()s would.
  const auto rows = input.split_with_sizes(sizes);
  const auto experts = weight.unbind(0);
  std::vector<at::Tensor> outs;
  outs.reserve(rows.size());
  for (int64_t g = 0; g < groups; ++g) outs.push_back(rows[static_cast<size_t>(g)].mm(experts[static_cast<size_t>(g)]));
  return at::cat(outs);
}

GroupedLinearImpl::GroupedLinearImpl(const GroupedLinearOptions& options_) : options(options_) { reset(); }

void GroupedLinearImpl::reset() {
  for (const auto& [field, size] : {std::pair<const char*, int64_t>{"groups", options.groups()},
                                    {"in_features", options.in_features()},
                                    {"out_features", options.out_features()}}) {
    if (size < 0) {
      throw d9d::peft::ConfigError(std::string("GroupedLinearOptions.") + field,
                                   "must be >= 0, got " + std::to_string(size) + " (d9d::nn::GroupedLinear)");
    }
  }
  weight = register_parameter("weight",
                              torch::empty({options.groups(), options.in_features(), options.out_features()}));
  reset_parameters();
}

void GroupedLinearImpl::reset_parameters() {
  // d9d's init: uniform(-1/sqrt(in), 1/sqrt(in)) for every expert (0 without inputs).
  const int64_t in = options.in_features();
  const double bound = in > 0 ? 1.0 / std::sqrt(static_cast<double>(in)) : 0.0;
  torch::nn::init::uniform_(weight, -bound, bound);
}

void GroupedLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "d9d::nn::GroupedLinear(groups=" << options.groups() << ", in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ")";
}

std::vector<int64_t> GroupedLinearImpl::check_input(const at::Tensor& input, const at::Tensor& group_sizes) const {
  const std::string layer = fmt::format("d9d::nn::GroupedLinear(groups={}, in_features={}, out_features={})",
                                        options.groups(), options.in_features(), options.out_features());
  auto fail = [&layer](const std::string& what) { throw d9d::peft::PeftError(layer + ": " + what); };
  if (!input.defined()) fail("input is an undefined tensor");
  if (input.dim() != 2 || input.size(1) != options.in_features()) {
    fail(fmt::format("input must be [tokens, in_features={}], got {}; flatten the tokens to rows "
                     "(input.reshape({{-1, {}}})), sorted by group",
                     options.in_features(), shape(input.sizes()), options.in_features()));
  }
  if (input.scalar_type() != weight.scalar_type() || input.device() != weight.device()) {
    fail(fmt::format("input is {} on {} but the weight is {} on {}; move the input or the layer (->to(...))",
                     c10::toString(input.scalar_type()), input.device().str(), c10::toString(weight.scalar_type()),
                     weight.device().str()));
  }
  if (!group_sizes.defined()) fail("group_sizes is an undefined tensor");
  if (group_sizes.scalar_type() != at::kLong) {
    fail(fmt::format("group_sizes must be int64 (torch::kLong), got {}", c10::toString(group_sizes.scalar_type())));
  }
  if (group_sizes.dim() != 1 || group_sizes.size(0) != options.groups()) {
    fail(fmt::format("group_sizes has shape {}, expected [{}]: one token count per group", shape(group_sizes.sizes()),
                     options.groups()));
  }
  const at::Tensor host = group_sizes.to(at::kCPU).contiguous();
  std::vector<int64_t> sizes(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
  int64_t total = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    if (sizes[g] < 0) fail(fmt::format("group_sizes[{}] is {}; token counts must be >= 0", g, sizes[g]));
    total += sizes[g];
  }
  if (total != input.size(0)) {
    fail(fmt::format("group_sizes sum to {} but the input has {} tokens (input {}); every row belongs to one group, "
                     "rows sorted by group",
                     total, input.size(0), shape(input.sizes())));
  }
  return sizes;
}

at::Tensor GroupedLinearImpl::forward(const at::Tensor& input, const at::Tensor& group_sizes) {
  if (auto target = override_target()) {
    auto* grouped = dynamic_cast<GroupedLayerOverride*>(target.get());
    if (!grouped) {
      throw d9d::peft::PeftError(
          "d9d::nn::GroupedLinear: the PEFT wrapper installed on this layer cannot take group sizes (it implements "
          "no d9d::nn::GroupedLayerOverride); wrap grouped layers with a grouped adapter layer");
    }
    return grouped->forward(input, group_sizes);
  }
  return forward_base(input, group_sizes);
}

at::Tensor GroupedLinearImpl::forward_base(const at::Tensor& input, const at::Tensor& group_sizes) const {
  return grouped_linear(input, weight, check_input(input, group_sizes));
}

}  // namespace d9d::nn
