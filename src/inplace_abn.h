// Declarations shared by every backend of the inplace_abn custom ops: argument checks whose messages
// name the offending argument, the activation-string parser and the dtype rules.
//
// dtype rules (shared by CPU and CUDA):
//   x: float64, float32, float16 or bfloat16.
//   statistics are computed and returned in at::opmath_type of x (float32 for the half types).
//   weight / bias / mean / var: 1-D of size C, on x's device, dtype either x's or its opmath type
//   (half/bf16 activations with float32 parameters is the usual mixed-precision setup).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>

#include "activation.h"

namespace inplace_abn {

// Parses the schema's `str activation` and validates its parameter. The Python layer validates at
// module construction already; this keeps direct torch.ops callers from reaching undefined math.
inline Activation parse_activation(std::string_view name, double param) {
  if (name == "identity") {
    return Activation::Identity;
  }
  if (name == "leaky_relu") {
    TORCH_CHECK(
        param > 0.0, "activation_param (negative slope) must be > 0 for the fused leaky_relu kernels, got ", param,
        "; slope 0 is not invertible and is handled by the Python layer");
    return Activation::LeakyReLU;
  }
  if (name == "elu") {
    TORCH_CHECK(param > 0.0, "activation_param (ELU alpha) must be > 0, got ", param);
    return Activation::ELU;
  }
  TORCH_CHECK(
      false, "activation must be one of 'identity', 'leaky_relu', 'elu' in the fused kernels, got '", name, "'");
}

// eps > 0 keeps both sqrt(var + eps) and gamma = |w| + eps away from 0, so every op stays invertible.
inline void check_eps(double eps) {
  TORCH_CHECK(eps > 0.0, "eps must be > 0 (it keeps |weight| + eps and var + eps invertible), got ", eps);
}

inline void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 2, name, " must have shape (N, C, *) with at least 2 dimensions, got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(
      dt == at::kDouble || dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
      " must be float64, float32, float16 or bfloat16, got ", dt);
}

// A per-channel vector: 1-D, C entries, on x's device, dtype x's or x's opmath type.
inline void check_channel_vector(const at::Tensor& v, const char* name, const at::Tensor& x) {
  const int64_t channels = x.size(1);
  TORCH_CHECK(
      v.dim() == 1 && v.size(0) == channels, name, " must be a 1-D tensor with one entry per channel (", channels,
      "), got shape ", v.sizes());
  TORCH_CHECK(
      v.device() == x.device(), name, " must be on the same device as the input (", x.device(), "), got ", v.device());
  const auto op = at::toOpMathType(x.scalar_type());
  if (op == x.scalar_type()) {
    TORCH_CHECK(v.scalar_type() == op, name, " must have dtype ", op, " like the input, got ", v.scalar_type());
  } else {
    TORCH_CHECK(
        v.scalar_type() == x.scalar_type() || v.scalar_type() == op, name, " must have dtype ", x.scalar_type(), " or ",
        op, " for an input of dtype ", x.scalar_type(), ", got ", v.scalar_type());
  }
}

inline void check_optional_channel_vector(const std::optional<at::Tensor>& v, const char* name, const at::Tensor& x) {
  if (v.has_value() && v->defined()) {
    check_channel_vector(*v, name, x);
  }
}

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(
      a.sizes() == b.sizes(), a_name, " and ", b_name, " must have the same shape, got ", a.sizes(), " and ",
      b.sizes());
  TORCH_CHECK(
      a.scalar_type() == b.scalar_type(), a_name, " and ", b_name, " must have the same dtype, got ", a.scalar_type(),
      " and ", b.scalar_type());
  TORCH_CHECK(
      a.device() == b.device(), a_name, " and ", b_name, " must be on the same device, got ", a.device(), " and ",
      b.device());
}

// ------------------------------------------------------------------------------------------------
// Memory layouts every backend walks without a copy:
//   NCS: contiguous (N, C, *) -- every (n, c) row of S = prod(*) elements is one channel.
//   NSC: channels_last / channels_last_3d, and (N, C) inputs -- C is the innermost dimension.
// Any other stride pattern is made contiguous first (and, for the in-place op, written back).

enum class Layout { NCS, NSC };

// Returns the layout the kernels can walk without a copy, if any.
inline std::optional<Layout> native_layout(const at::Tensor& x) {
  const int64_t spatial = x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1));
  if (x.is_contiguous()) {
    // (N, C) and (N, C, 1, ...) are channel-innermost too; NSC walks them with full vector width.
    return spatial == 1 ? Layout::NSC : Layout::NCS;
  }
  if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    return Layout::NSC;
  }
  return std::nullopt;
}

inline at::MemoryFormat memory_format_of(Layout layout, const at::Tensor& x) {
  if (layout == Layout::NSC && x.dim() == 4) return at::MemoryFormat::ChannelsLast;
  if (layout == Layout::NSC && x.dim() == 5) return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// Brings `t` into a layout the kernels walk; `like` fixes which one when pairing two tensors.
inline at::Tensor to_native(const at::Tensor& t, std::optional<Layout> like = std::nullopt) {
  if (like.has_value()) {
    const auto fmt = memory_format_of(*like, t);
    return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
  }
  return native_layout(t).has_value() ? t : t.contiguous();
}

// An output with the strides of `like` (what the fake kernels promise) and the tensor the kernels write:
// the output itself when its layout is the walkable one of `like_native`, else a scratch tensor that
// finish() copies back.
struct Output {
  at::Tensor result, work;
  void finish() {
    if (!work.is_same(result)) {
      result.copy_(work);
    }
  }
};

inline Output make_output(const at::Tensor& like, const at::Tensor& like_native) {
  auto result = at::empty_like(like);
  const auto layout = native_layout(like_native);
  const bool direct = result.numel() == 0 ||
                      (native_layout(result) == layout && result.is_contiguous(memory_format_of(*layout, result)));
  return {result, direct ? result : at::empty_like(like_native)};
}

// The activation's constants in the compute type (1 / param precomputed; identity has none). A slope / alpha
// that rounds to 0 in T or whose reciprocal overflows would turn the inversion into inf / NaN gradients:
// refused, as the Python layer does (validation._check_invertible_in), for direct torch.ops callers.
template <typename T>
ActivationParams<T> activation_params(Activation a, double param) {
  if (a == Activation::Identity) {
    return {T(0), T(0)};
  }
  const T p = static_cast<T>(param);
  const T inv = T(1) / p;
  TORCH_CHECK(
      p > T(0) && inv < std::numeric_limits<T>::infinity(), "activation_param ", param, " is too small for ",
      sizeof(T) >= 8 ? "float64" : "float32", " computation: the inversion divides by it and 1 / ", param,
      " overflows; use a value >= ", 1.0 / static_cast<double>(std::numeric_limits<T>::max()), " (e.g. 0.01)");
  return {p, inv};
}

// Calls f(std::integral_constant<Activation, A>) so kernels are instantiated per activation.
template <typename F>
void dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::Identity:
      return f(std::integral_constant<Activation, Activation::Identity>{});
    case Activation::LeakyReLU:
      return f(std::integral_constant<Activation, Activation::LeakyReLU>{});
    case Activation::ELU:
      return f(std::integral_constant<Activation, Activation::ELU>{});
  }
}

// Calls f(std::bool_constant<has_residual>) so kernels without a residual neither load nor add one.
template <typename F>
void dispatch_residual(bool has_residual, F&& f) {
  if (has_residual) {
    return f(std::true_type{});
  }
  return f(std::false_type{});
}

// ------------------------------------------------------------------------------------------------
// The argument checks of each op, shared by the backends so their errors are identical.

inline bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The residual of the fused layer: x's shape, dtype and device (any strides). Returns whether it is given.
inline bool check_residual(const std::optional<at::Tensor>& residual, const at::Tensor& x, const char* x_name) {
  if (!defined(residual)) return false;
  check_same_shape(*residual, "residual", x, x_name);
  return true;
}

// The residual in y's native layout, so that it shares y's element offsets (undefined when absent).
inline at::Tensor residual_like(const std::optional<at::Tensor>& residual, bool has_residual, const at::Tensor& y) {
  return has_residual ? to_native(*residual, native_layout(y)) : at::Tensor();
}

// The residual gradient of backward / backward_train when there is no residual: an empty (0,) tensor.
inline at::Tensor no_grad_residual(const at::Tensor& y) { return at::empty({0}, y.options()); }

inline Activation check_forward_args(
    const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, std::string_view activation, double activation_param) {
  check_input(x, "x");
  check_channel_vector(mean, "mean", x);
  check_channel_vector(var, "var", x);
  check_optional_channel_vector(weight, "weight", x);
  check_optional_channel_vector(bias, "bias", x);
  check_eps(eps);
  return parse_activation(activation, activation_param);
}

inline Activation check_backward_reduce_args(
    const at::Tensor& y, const at::Tensor& dy, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, std::string_view activation, double activation_param) {
  check_input(y, "y");
  check_same_shape(y, "y", dy, "dy");
  check_optional_channel_vector(weight, "weight", y);
  check_optional_channel_vector(bias, "bias", y);
  check_eps(eps);
  return parse_activation(activation, activation_param);
}

// Returns the activation and whether the means are given (training) or not (eval).
inline std::pair<Activation, bool> check_backward_args(
    const at::Tensor& y, const at::Tensor& dy, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean_dz,
    const std::optional<at::Tensor>& mean_dz_xhat, double eps, std::string_view activation, double activation_param) {
  check_input(y, "y");
  check_same_shape(y, "y", dy, "dy");
  check_channel_vector(var, "var", y);
  check_optional_channel_vector(weight, "weight", y);
  check_optional_channel_vector(bias, "bias", y);
  check_optional_channel_vector(mean_dz, "mean_dz", y);
  check_optional_channel_vector(mean_dz_xhat, "mean_dz_xhat", y);
  const bool has_dz = mean_dz.has_value() && mean_dz->defined();
  const bool has_dz_xhat = mean_dz_xhat.has_value() && mean_dz_xhat->defined();
  TORCH_CHECK(has_dz == has_dz_xhat, "mean_dz and mean_dz_xhat must be given together (training) or both None (eval)");
  check_eps(eps);
  return {parse_activation(activation, activation_param), has_dz};
}

inline Activation check_invert_args(
    const at::Tensor& y, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    std::string_view activation, double activation_param) {
  check_input(y, "y");
  check_optional_channel_vector(weight, "weight", y);
  check_optional_channel_vector(bias, "bias", y);
  check_eps(eps);
  return parse_activation(activation, activation_param);
}

// Running statistics updated by forward_train_: both or neither, (C,) floating vectors on x's device
// (any float dtype: module buffers often stay float32 under a float16 input); momentum in [0, 1].
// Returns whether they are present.
inline bool check_running_stats(
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    const at::Tensor& x) {
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_mean == has_var, "running_mean and running_var must be both tensors or both None");
  if (!has_mean) return false;
  const int64_t channels = x.size(1);
  for (const auto& [v, name] : {std::pair(&*running_mean, "running_mean"), std::pair(&*running_var, "running_var")}) {
    TORCH_CHECK(
        v->dim() == 1 && v->size(0) == channels, name, " must be a 1-D tensor with one entry per channel (", channels,
        "), got shape ", v->sizes());
    TORCH_CHECK(
        v->device() == x.device(), name, " must be on the input's device (", x.device(), "), got ", v->device());
    TORCH_CHECK(at::isFloatingType(v->scalar_type()), name, " must be a floating-point tensor, got ", v->scalar_type());
  }
  TORCH_CHECK(
      momentum >= 0.0 && momentum <= 1.0, "momentum must be in [0, 1] (the weight of the batch statistics), got ",
      momentum);
  const int64_t count = channels == 0 ? 0 : x.numel() / channels;
  TORCH_CHECK(
      count > 1, "running_var: the unbiased batch variance needs more than 1 value per channel, got input size ",
      x.sizes());
  return true;
}

}  // namespace inplace_abn
