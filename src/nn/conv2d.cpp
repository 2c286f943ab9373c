#include <d9d/nn/conv2d.h>
#include <d9d/peft/errors.h>

#include <torch/nn/functional/conv.h>
#include <torch/nn/functional/padding.h>
#include <torch/nn/init.h>

#include <cmath>
#include <string>
#include <type_traits>

namespace d9d::nn {

namespace {

using d9d::peft::ConfigError;

std::string pair_str(const torch::ExpandingArray<2>& a) {
  return "(" + std::to_string((*a)[0]) + ", " + std::to_string((*a)[1]) + ")";
}

/// `torch::nn::functional::pad`'s mode for a convolution's padding mode other than zeros.
torch::nn::functional::PadFuncOptions::mode_t pad_mode(const torch::nn::Conv2dOptions::padding_mode_t& mode) {
  // Unqualified `visit`: c10::visit (LibTorch 1.13's variant) or std::visit (2.x), found by argument.
  return visit(
      [](const auto& m) -> torch::nn::functional::PadFuncOptions::mode_t {
        using M = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<M, torch::enumtype::kReflect>) return torch::kReflect;
        else if constexpr (std::is_same_v<M, torch::enumtype::kReplicate>) return torch::kReplicate;
        else if constexpr (std::is_same_v<M, torch::enumtype::kCircular>) return torch::kCircular;
        else return torch::kConstant;
      },
      mode);
}

bool zeros_padding(const torch::nn::Conv2dOptions::padding_mode_t& mode) {
  return visit([](const auto& m) { return std::is_same_v<std::decay_t<decltype(m)>, torch::enumtype::kZeros>; }, mode);
}

}  // namespace

Conv2dImpl::Conv2dImpl(torch::nn::Conv2dOptions options_) : options(std::move(options_)) { reset(); }

void Conv2dImpl::reset() {
  const int64_t in = options.in_channels(), out = options.out_channels(), groups = options.groups();
  if (in <= 0) throw ConfigError("Conv2dOptions.in_channels", "must be > 0, got " + std::to_string(in));
  if (out <= 0) throw ConfigError("Conv2dOptions.out_channels", "must be > 0, got " + std::to_string(out));
  if (groups <= 0) throw ConfigError("Conv2dOptions.groups", "must be > 0, got " + std::to_string(groups));
  if (in % groups != 0 || out % groups != 0) {
    throw ConfigError("Conv2dOptions.groups", "in_channels " + std::to_string(in) + " and out_channels " +
                                                  std::to_string(out) + " must both be divisible by groups " +
                                                  std::to_string(groups));
  }
  for (int i = 0; i < 2; ++i) {
    if ((*options.kernel_size())[i] <= 0 || (*options.stride())[i] <= 0 || (*options.dilation())[i] <= 0) {
      throw ConfigError("Conv2dOptions", "kernel_size " + pair_str(options.kernel_size()) + ", stride " +
                                             pair_str(options.stride()) + " and dilation " +
                                             pair_str(options.dilation()) + " must be positive");
    }
  }
  // The explicit padding a non-zeros padding mode applies before the convolution, as torch::nn::Conv2d.
  reversed_padding_.assign(4, 0);
  visit(
      [this](const auto& pad) {
        using P = std::decay_t<decltype(pad)>;
        if constexpr (std::is_same_v<P, torch::enumtype::kSame>) {
          for (int i = 0; i < 2; ++i) {
            if ((*options.stride())[i] != 1) {
              throw ConfigError("Conv2dOptions.padding", "\"same\" is not supported for strided convolutions (stride " +
                                                             pair_str(options.stride()) + "); give the padding");
            }
            const int64_t total = (*options.dilation())[i] * ((*options.kernel_size())[i] - 1);
            reversed_padding_[2 * (1 - i)] = total / 2;
            reversed_padding_[2 * (1 - i) + 1] = total - total / 2;
          }
        } else if constexpr (std::is_same_v<P, torch::ExpandingArray<2>>) {
          for (int i = 0; i < 2; ++i) {
            if ((*pad)[i] < 0) {
              throw ConfigError("Conv2dOptions.padding", "must be >= 0, got " + pair_str(pad));
            }
            reversed_padding_[2 * (1 - i)] = reversed_padding_[2 * (1 - i) + 1] = (*pad)[i];
          }
        }
      },
      options.padding());
  std::vector<int64_t> sizes = {out, in / groups};
  sizes.insert(sizes.end(), options.kernel_size()->begin(), options.kernel_size()->end());
  weight = register_parameter("weight", torch::empty(sizes));
  if (options.bias()) {
    bias = register_parameter("bias", torch::empty({out}));
  } else {
    bias = register_parameter("bias", {}, /*requires_grad=*/false);
  }
  reset_parameters();
}

void Conv2dImpl::reset_parameters() {
  // The same sequence of random draws as torch::nn::Conv2d, so a seeded model
  // initialises identically with either layer.
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5));
  if (bias.defined()) {
    const int64_t fan_in = std::get<0>(torch::nn::init::_calculate_fan_in_and_fan_out(weight));
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

void Conv2dImpl::pretty_print(std::ostream& stream) const {
  stream << std::boolalpha << "d9d::nn::Conv2d(" << options.in_channels() << ", " << options.out_channels()
         << ", kernel_size=" << options.kernel_size() << ", stride=" << options.stride();
  visit(
      [&stream](const auto& pad) {
        using P = std::decay_t<decltype(pad)>;
        if constexpr (std::is_same_v<P, torch::enumtype::kSame>) stream << ", padding='same'";
        else if constexpr (std::is_same_v<P, torch::enumtype::kValid>) stream << ", padding='valid'";
        else stream << ", padding=" << pad;
      },
      options.padding());
  if (*options.dilation() != *torch::ExpandingArray<2>(1)) stream << ", dilation=" << options.dilation();
  if (options.groups() != 1) stream << ", groups=" << options.groups();
  if (!options.bias()) stream << ", bias=false";
  if (!zeros_padding(options.padding_mode())) stream << ", padding_mode=" << torch::enumtype::get_enum_name(options.padding_mode());
  stream << ")";
}

at::Tensor Conv2dImpl::forward(const at::Tensor& input) {
  if (auto target = override_target()) return target->forward(input);
  return forward_base(input);
}

at::Tensor Conv2dImpl::forward_base(const at::Tensor& input) const { return convolve(input, weight, bias); }

at::Tensor Conv2dImpl::convolve(const at::Tensor& input, const at::Tensor& w, const at::Tensor& b) const {
  namespace F = torch::nn::functional;
  if (!zeros_padding(options.padding_mode())) {
    const at::Tensor padded = F::pad(input, F::PadFuncOptions(reversed_padding_).mode(pad_mode(options.padding_mode())));
    return F::detail::conv2d(padded, w, b, options.stride(), torch::ExpandingArray<2>(0), options.dilation(),
                             options.groups());
  }
  return F::detail::conv2d(input, w, b, options.stride(), options.padding(), options.dilation(), options.groups());
}

}  // namespace d9d::nn
