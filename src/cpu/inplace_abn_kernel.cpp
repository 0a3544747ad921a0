// CPU kernels of the inplace_abn ops. The per-element math comes from src/activation.h (shared with the
// CUDA kernels); this file only decides how the tensor is walked and how work is split over threads.
//
// Memory layouts handled natively (anything else is made contiguous first):
//   NCS: contiguous (N, C, *) -- every (n, c) row of S = prod(*) elements is one channel.
//   NSC: channels_last / channels_last_3d, and (N, C) inputs -- C is the innermost dimension.
// Both are walked as independent blocks of ~kBlock contiguous elements, which is what gets parallelised:
// this keeps every thread busy whether C is 1 or 2048, and a block is small enough to be read twice
// from L1/L2 (two-pass statistics at the memory cost of one pass).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../inplace_abn.h"

namespace inplace_abn {
namespace {

constexpr int64_t kBlock = 4096;  // elements per work unit (16 KiB of float32)

enum class Layout { NCS, NSC };

struct Geometry {
  Layout layout;
  int64_t N, C, S;   // x viewed as (N, C, S)
  int64_t row_len;   // NCS: S; NSC: C
  int64_t rows;      // NCS: N * C; NSC: N * S
  int64_t per_unit;  // NCS: elements of a row per unit; NSC: rows per unit
  int64_t units_per_row;  // NCS only
  int64_t units;
};

// Returns the layout the kernels can walk without a copy, if any.
std::optional<Layout> native_layout(const at::Tensor& x) {
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

at::MemoryFormat memory_format_of(Layout layout, const at::Tensor& x) {
  if (layout == Layout::NSC && x.dim() == 4) return at::MemoryFormat::ChannelsLast;
  if (layout == Layout::NSC && x.dim() == 5) return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// Brings `t` into a layout the kernels walk; `like` fixes which one when pairing two tensors.
at::Tensor to_native(const at::Tensor& t, std::optional<Layout> like = std::nullopt) {
  if (like.has_value()) {
    const auto fmt = memory_format_of(*like, t);
    return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
  }
  return native_layout(t).has_value() ? t : t.contiguous();
}

Geometry geometry(const at::Tensor& x) {
  Geometry g;
  g.layout = native_layout(x).value();
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = g.N * g.C == 0 ? 0 : x.numel() / (g.N * g.C);
  if (g.layout == Layout::NCS) {
    g.row_len = g.S;
    g.rows = g.N * g.C;
    g.per_unit = std::min<int64_t>(kBlock, std::max<int64_t>(1, g.S));
    g.units_per_row = (g.S + g.per_unit - 1) / g.per_unit;
    g.units = g.rows * g.units_per_row;
  } else {
    g.row_len = g.C;
    g.rows = g.N * g.S;
    g.per_unit = std::max<int64_t>(1, kBlock / std::max<int64_t>(1, g.C));
    g.units_per_row = 1;
    g.units = (g.rows + g.per_unit - 1) / g.per_unit;
  }
  return g;
}

// Grain so that tiny tensors stay on the calling thread (thread wake-up costs more than the work).
int64_t grain_units(const Geometry& g) {
  const int64_t unit_elems = g.layout == Layout::NCS ? g.per_unit : g.per_unit * g.C;
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, unit_elems));
}

// Calls f(offset, len, c) for each NCS run of unit u (one run) -- or f(offset, rows) for NSC.
struct NcsRun {
  int64_t offset, len, channel;
};
inline NcsRun ncs_run(const Geometry& g, int64_t u) {
  const int64_t row = u / g.units_per_row;
  const int64_t k = u % g.units_per_row;
  const int64_t start = k * g.per_unit;
  return {row * g.S + start, std::min(g.per_unit, g.S - start), row % g.C};
}
struct NscRows {
  int64_t first_row, rows;
};
inline NscRows nsc_rows(const Geometry& g, int64_t u) {
  const int64_t first = u * g.per_unit;
  return {first, std::min(g.per_unit, g.rows - first)};
}

// Per-channel vector as opmath values on the host (C is small; the copy is negligible).
template <typename opmath_t>
std::vector<opmath_t> channel_values(const std::optional<at::Tensor>& v, int64_t C) {
  if (!v.has_value() || !v->defined()) return {};
  const auto t = v->to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
  const opmath_t* p = t.const_data_ptr<opmath_t>();
  return std::vector<opmath_t>(p, p + C);
}

template <typename T>
const T* ptr_or_null(const std::vector<T>& v) {
  return v.empty() ? nullptr : v.data();
}

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

template <typename T>
ActivationParams<T> activation_params(Activation a, double param) {
  const T p = a == Activation::Identity ? T(0) : static_cast<T>(param);
  return {p, a == Activation::Identity ? T(0) : T(1) / p};
}

// Chan et al.'s pairwise merge of (count, mean, M2) partial statistics, in double.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
  void merge(double n_b, double mean_b, double m2_b) {
    if (n_b == 0) return;
    const double n = count + n_b;
    const double delta = mean_b - mean;
    mean += delta * (n_b / n);
    m2 += m2_b + delta * delta * (count * n_b / n);
    count = n;
  }
};

// ------------------------------------------------------------------------------------------------
// statistics

std::tuple<at::Tensor, at::Tensor> statistics_cpu(const at::Tensor& x_in) {
  check_input(x_in, "x");
  const auto x = to_native(x_in);
  const int64_t C = x.size(1);
  const auto op_type = at::toOpMathType(x.scalar_type());
  auto mean = at::empty({C}, x.options().dtype(op_type));
  auto var = at::empty({C}, x.options().dtype(op_type));
  if (x.numel() == 0) {
    mean.fill_(NAN);
    var.fill_(NAN);
    return {mean, var};
  }
  const Geometry g = geometry(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_statistics", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // Partial (mean, M2) of every unit; NSC units hold one pair per channel.
    const int64_t slots = g.layout == Layout::NCS ? 1 : C;
    std::vector<double> part_mean(g.units * slots), part_m2(g.units * slots), part_n(g.units * slots);
    at::parallel_for(0, g.units, grain_units(g), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> acc, acc2;
      for (int64_t u = begin; u < end; ++u) {
        if (g.layout == Layout::NCS) {
          const NcsRun r = ncs_run(g, u);
          const scalar_t* p = xp + r.offset;
          opmath_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < r.len; ++i) s += static_cast<opmath_t>(p[i]);
          const opmath_t m = s / static_cast<opmath_t>(r.len);
          // NB: second pass over the block (still in cache) instead of sum of squares: no cancellation.
          opmath_t s2 = 0;
#pragma omp simd reduction(+ : s2)
          for (int64_t i = 0; i < r.len; ++i) {
            const opmath_t d = static_cast<opmath_t>(p[i]) - m;
            s2 += d * d;
          }
          part_n[u] = static_cast<double>(r.len);
          part_mean[u] = static_cast<double>(m);
          part_m2[u] = static_cast<double>(s2);
        } else {
          const NscRows r = nsc_rows(g, u);
          const scalar_t* p = xp + r.first_row * C;
          acc.assign(C, opmath_t(0));
          acc2.assign(C, opmath_t(0));
          for (int64_t row = 0; row < r.rows; ++row) {
            const scalar_t* q = p + row * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<opmath_t>(q[c]);
          }
          const opmath_t inv_rows = opmath_t(1) / static_cast<opmath_t>(r.rows);
          for (int64_t c = 0; c < C; ++c) acc[c] *= inv_rows;
          for (int64_t row = 0; row < r.rows; ++row) {
            const scalar_t* q = p + row * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const opmath_t d = static_cast<opmath_t>(q[c]) - acc[c];
              acc2[c] += d * d;
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            part_n[u * C + c] = static_cast<double>(r.rows);
            part_mean[u * C + c] = static_cast<double>(acc[c]);
            part_m2[u * C + c] = static_cast<double>(acc2[c]);
          }
        }
      }
    });
    opmath_t* mp = mean.mutable_data_ptr<opmath_t>();
    opmath_t* vp = var.mutable_data_ptr<opmath_t>();
    at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        Moments mo;
        if (g.layout == Layout::NCS) {
          for (int64_t n = 0; n < g.N; ++n) {
            const int64_t u0 = (n * C + c) * g.units_per_row;
            for (int64_t k = 0; k < g.units_per_row; ++k) {
              mo.merge(part_n[u0 + k], part_mean[u0 + k], part_m2[u0 + k]);
            }
          }
        } else {
          for (int64_t u = 0; u < g.units; ++u) {
            mo.merge(part_n[u * C + c], part_mean[u * C + c], part_m2[u * C + c]);
          }
        }
        mp[c] = static_cast<opmath_t>(mo.mean);
        vp[c] = static_cast<opmath_t>(mo.m2 / mo.count);
      }
    });
  });
  return {mean, var};
}

// ------------------------------------------------------------------------------------------------
// Elementwise passes. Per-channel constants are read through an accessor so that one inner loop
// serves both layouts: NCS broadcasts one channel's constants over a run, NSC indexes them by c.

template <typename T>
struct Broadcast {
  T value;
  const T& operator[](int64_t) const { return value; }
};
template <typename T>
struct PerChannel {
  const T* values;
  const T& operator[](int64_t i) const { return values[i]; }
};

// Calls body(in_offset, len, accessor-maker) for every contiguous run in [begin, end) units.
template <typename Consts, typename Body>
void for_each_run(const Geometry& g, const std::vector<Consts>& consts, int64_t begin, int64_t end, Body&& body) {
  for (int64_t u = begin; u < end; ++u) {
    if (g.layout == Layout::NCS) {
      const NcsRun r = ncs_run(g, u);
      body(r.offset, r.len, Broadcast<Consts>{consts[r.channel]});
    } else {
      const NscRows r = nsc_rows(g, u);
      for (int64_t row = r.first_row; row < r.first_row + r.rows; ++row) {
        body(row * g.C, g.C, PerChannel<Consts>{consts.data()});
      }
    }
  }
}

template <typename T>
struct ForwardConsts {
  T scale, shift;
};

template <Activation A, typename scalar_t, typename opmath_t, typename Acc>
void forward_run(scalar_t* x, int64_t len, const Acc& k, const ActivationParams<opmath_t>& p) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    x[i] = static_cast<scalar_t>(
        forward_element<A, opmath_t>(static_cast<opmath_t>(x[i]), k[i].scale, k[i].shift, p));
  }
}

void forward_cpu(
    at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view activation, double activation_param) {
  check_input(x, "x");
  check_channel_vector(mean, "mean", x);
  check_channel_vector(var, "var", x);
  check_optional_channel_vector(weight, "weight", x);
  check_optional_channel_vector(bias, "bias", x);
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  const Activation act = parse_activation(activation, activation_param);
  if (x.numel() == 0) return;
  // A layout the kernels cannot walk is computed in a contiguous copy and written back: the op's
  // contract (y overwrites x) holds for every stride pattern.
  at::Tensor work = to_native(x);
  const Geometry g = geometry(work);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = g.C;
    const auto m = channel_values<opmath_t>(mean, C);
    const auto v = channel_values<opmath_t>(var, C);
    const auto w = channel_values<opmath_t>(weight, C);
    const auto b = channel_values<opmath_t>(bias, C);
    std::vector<ForwardConsts<opmath_t>> consts(C);
    for (int64_t c = 0; c < C; ++c) {
      const auto a = affine_params<opmath_t>(ptr_or_null(w), ptr_or_null(b), c, static_cast<opmath_t>(eps));
      const opmath_t rstd = opmath_t(1) / std::sqrt(v[c] + static_cast<opmath_t>(eps));
      const opmath_t scale = a.gamma * rstd;
      consts[c] = {scale, a.beta - m[c] * scale};
    }
    const auto p = activation_params<opmath_t>(act, activation_param);
    scalar_t* xp = work.mutable_data_ptr<scalar_t>();
    dispatch_activation(act, [&](auto A) {
      at::parallel_for(0, g.units, grain_units(g), [&](int64_t begin, int64_t end) {
        for_each_run(g, consts, begin, end, [&](int64_t off, int64_t len, const auto& k) {
          forward_run<decltype(A)::value, scalar_t, opmath_t>(xp + off, len, k, p);
        });
      });
    });
  });
  if (!work.is_same(x)) {
    x.copy_(work);
  }
}

// ------------------------------------------------------------------------------------------------
// backward_reduce: one pass over (y, dy) recovering x_hat on the fly; nothing full-size is written.

std::tuple<at::Tensor, at::Tensor> backward_reduce_cpu(
    const at::Tensor& y_in, const at::Tensor& dy_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view activation, double activation_param) {
  check_input(y_in, "y");
  check_same_shape(y_in, "y", dy_in, "dy");
  check_optional_channel_vector(weight, "weight", y_in);
  check_optional_channel_vector(bias, "bias", y_in);
  const Activation act = parse_activation(activation, activation_param);
  const auto y = to_native(y_in);
  const auto dy = to_native(dy_in, native_layout(y));
  const int64_t C = y.size(1);
  const auto op_type = at::toOpMathType(y.scalar_type());
  auto sum_dz = at::zeros({C}, y.options().dtype(op_type));
  auto sum_dz_xhat = at::zeros({C}, y.options().dtype(op_type));
  if (y.numel() == 0) return {sum_dz, sum_dz_xhat};
  const Geometry g = geometry(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "inplace_abn_backward_reduce", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto w = channel_values<opmath_t>(weight, C);
    const auto b = channel_values<opmath_t>(bias, C);
    std::vector<AffineParams<opmath_t>> aff(C);
    for (int64_t c = 0; c < C; ++c) {
      aff[c] = affine_params<opmath_t>(ptr_or_null(w), ptr_or_null(b), c, static_cast<opmath_t>(eps));
    }
    const auto p = activation_params<opmath_t>(act, activation_param);
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const int64_t slots = g.layout == Layout::NCS ? 1 : C;
    std::vector<double> part_dz(g.units * slots), part_dz_xhat(g.units * slots);
    dispatch_activation(act, [&](auto A) {
      constexpr Activation kA = decltype(A)::value;
      at::parallel_for(0, g.units, grain_units(g), [&](int64_t begin, int64_t end) {
        std::vector<opmath_t> acc1, acc2;
        for (int64_t u = begin; u < end; ++u) {
          if (g.layout == Layout::NCS) {
            const NcsRun r = ncs_run(g, u);
            const auto a = aff[r.channel];
            const scalar_t* yq = yp + r.offset;
            const scalar_t* dq = dyp + r.offset;
            opmath_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
            for (int64_t i = 0; i < r.len; ++i) {
              backward_reduce_element<kA, opmath_t>(
                  static_cast<opmath_t>(yq[i]), static_cast<opmath_t>(dq[i]), a, p, s1, s2);
            }
            part_dz[u] = static_cast<double>(s1);
            part_dz_xhat[u] = static_cast<double>(s2);
          } else {
            const NscRows r = nsc_rows(g, u);
            acc1.assign(C, opmath_t(0));
            acc2.assign(C, opmath_t(0));
            for (int64_t row = r.first_row; row < r.first_row + r.rows; ++row) {
              const scalar_t* yq = yp + row * C;
              const scalar_t* dq = dyp + row * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                backward_reduce_element<kA, opmath_t>(
                    static_cast<opmath_t>(yq[c]), static_cast<opmath_t>(dq[c]), aff[c], p, acc1[c], acc2[c]);
              }
            }
            for (int64_t c = 0; c < C; ++c) {
              part_dz[u * C + c] = static_cast<double>(acc1[c]);
              part_dz_xhat[u * C + c] = static_cast<double>(acc2[c]);
            }
          }
        }
      });
    });
    opmath_t* s1p = sum_dz.mutable_data_ptr<opmath_t>();
    opmath_t* s2p = sum_dz_xhat.mutable_data_ptr<opmath_t>();
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0, s2 = 0;
      if (g.layout == Layout::NCS) {
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t u0 = (n * C + c) * g.units_per_row;
          for (int64_t k = 0; k < g.units_per_row; ++k) {
            s1 += part_dz[u0 + k];
            s2 += part_dz_xhat[u0 + k];
          }
        }
      } else {
        for (int64_t u = 0; u < g.units; ++u) {
          s1 += part_dz[u * C + c];
          s2 += part_dz_xhat[u * C + c];
        }
      }
      s1p[c] = static_cast<opmath_t>(s1);
      s2p[c] = static_cast<opmath_t>(s2);
    }
  });
  return {sum_dz, sum_dz_xhat};
}

// ------------------------------------------------------------------------------------------------
// backward: dx from (y, dy) and the per-channel means of the reduction; dx is the only allocation.

template <typename T>
struct BackwardConsts {
  AffineParams<T> affine;
  T gamma_rstd, mean_dz, mean_dz_xhat;
};

template <Activation A, typename scalar_t, typename opmath_t, typename Acc>
void backward_run(
    const scalar_t* y, const scalar_t* dy, scalar_t* dx, int64_t len, const Acc& k,
    const ActivationParams<opmath_t>& p) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    dx[i] = static_cast<scalar_t>(backward_element<A, opmath_t>(
        static_cast<opmath_t>(y[i]), static_cast<opmath_t>(dy[i]), k[i].affine, p, k[i].gamma_rstd, k[i].mean_dz,
        k[i].mean_dz_xhat));
  }
}

at::Tensor backward_cpu(
    const at::Tensor& y_in, const at::Tensor& dy_in, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean_dz,
    const std::optional<at::Tensor>& mean_dz_xhat, double eps, c10::string_view activation,
    double activation_param) {
  check_input(y_in, "y");
  check_same_shape(y_in, "y", dy_in, "dy");
  check_channel_vector(var, "var", y_in);
  check_optional_channel_vector(weight, "weight", y_in);
  check_optional_channel_vector(bias, "bias", y_in);
  check_optional_channel_vector(mean_dz, "mean_dz", y_in);
  check_optional_channel_vector(mean_dz_xhat, "mean_dz_xhat", y_in);
  const bool has_dz = mean_dz.has_value() && mean_dz->defined();
  const bool has_dz_xhat = mean_dz_xhat.has_value() && mean_dz_xhat->defined();
  TORCH_CHECK(
      has_dz == has_dz_xhat, "mean_dz and mean_dz_xhat must be given together (training) or both None (eval)");
  const Activation act = parse_activation(activation, activation_param);
  // dx has y's strides (what the fake kernel promises); it is computed in a walkable layout.
  auto dx = at::empty_like(y_in);
  if (y_in.numel() == 0) return dx;
  const auto y = to_native(y_in);
  const auto layout = native_layout(y);
  const auto dy = to_native(dy_in, layout);
  const bool direct = dx.is_contiguous(memory_format_of(*layout, dx)) && native_layout(dx) == layout;
  at::Tensor out = direct ? dx : at::empty_like(y);
  const Geometry g = geometry(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "inplace_abn_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = g.C;
    const auto v = channel_values<opmath_t>(var, C);
    const auto w = channel_values<opmath_t>(weight, C);
    const auto b = channel_values<opmath_t>(bias, C);
    const auto m1 = channel_values<opmath_t>(mean_dz, C);
    const auto m2 = channel_values<opmath_t>(mean_dz_xhat, C);
    std::vector<BackwardConsts<opmath_t>> consts(C);
    for (int64_t c = 0; c < C; ++c) {
      const auto a = affine_params<opmath_t>(ptr_or_null(w), ptr_or_null(b), c, static_cast<opmath_t>(eps));
      const opmath_t rstd = opmath_t(1) / std::sqrt(v[c] + static_cast<opmath_t>(eps));
      consts[c] = {a, a.gamma * rstd, has_dz ? m1[c] : opmath_t(0), has_dz ? m2[c] : opmath_t(0)};
    }
    const auto p = activation_params<opmath_t>(act, activation_param);
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = out.mutable_data_ptr<scalar_t>();
    dispatch_activation(act, [&](auto A) {
      at::parallel_for(0, g.units, grain_units(g), [&](int64_t begin, int64_t end) {
        for_each_run(g, consts, begin, end, [&](int64_t off, int64_t len, const auto& k) {
          backward_run<decltype(A)::value, scalar_t, opmath_t>(yp + off, dyp + off, dxp + off, len, k, p);
        });
      });
    });
  });
  if (!direct) {
    dx.copy_(out);
  }
  return dx;
}

// ------------------------------------------------------------------------------------------------
// invert: x_hat from y (diagnostics). Returned in y's dtype and strides.

template <Activation A, typename scalar_t, typename opmath_t, typename Acc>
void invert_run(const scalar_t* y, scalar_t* out, int64_t len, const Acc& k, const ActivationParams<opmath_t>& p) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    out[i] = static_cast<scalar_t>(invert_element<A, opmath_t>(static_cast<opmath_t>(y[i]), k[i], p));
  }
}

at::Tensor invert_cpu(
    const at::Tensor& y_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, c10::string_view activation, double activation_param) {
  check_input(y_in, "y");
  check_optional_channel_vector(weight, "weight", y_in);
  check_optional_channel_vector(bias, "bias", y_in);
  const Activation act = parse_activation(activation, activation_param);
  auto xhat = at::empty_like(y_in);
  if (y_in.numel() == 0) return xhat;
  const auto y = to_native(y_in);
  const bool direct = native_layout(xhat) == native_layout(y) &&
      xhat.is_contiguous(memory_format_of(*native_layout(y), xhat));
  at::Tensor out = direct ? xhat : at::empty_like(y);
  const Geometry g = geometry(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "inplace_abn_invert", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = g.C;
    const auto w = channel_values<opmath_t>(weight, C);
    const auto b = channel_values<opmath_t>(bias, C);
    std::vector<AffineParams<opmath_t>> aff(C);
    for (int64_t c = 0; c < C; ++c) {
      aff[c] = affine_params<opmath_t>(ptr_or_null(w), ptr_or_null(b), c, static_cast<opmath_t>(eps));
    }
    const auto p = activation_params<opmath_t>(act, activation_param);
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    dispatch_activation(act, [&](auto A) {
      at::parallel_for(0, g.units, grain_units(g), [&](int64_t begin, int64_t end) {
        for_each_run(g, aff, begin, end, [&](int64_t off, int64_t len, const auto& k) {
          invert_run<decltype(A)::value, scalar_t, opmath_t>(yp + off, op + off, len, k, p);
        });
      });
    });
  });
  if (!direct) {
    xhat.copy_(out);
  }
  return xhat;
}

}  // namespace

// Registers the CPU implementations of the schemas declared in src/ops.cpp.
TORCH_LIBRARY_IMPL(inplace_abn, CPU, m) {
  m.impl("statistics", &statistics_cpu);
  m.impl("forward_", &forward_cpu);
  m.impl("backward_reduce", &backward_reduce_cpu);
  m.impl("backward", &backward_cpu);
  m.impl("invert", &invert_cpu);
}

}  // namespace inplace_abn
