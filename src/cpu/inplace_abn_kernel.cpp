// CPU kernels of the inplace_abn ops. The per-element math comes from src/activation.h (shared with the
// CUDA kernels); argument checks and memory layouts (NCS / NSC) from src/inplace_abn.h. This file only
// decides how the tensor is walked and how work is split over threads.
//
// Both layouts are walked as independent blocks of ~kBlock contiguous elements, which is what gets parallelised:
// this keeps every thread busy whether C is 1 or 2048, and a block is small enough to be read twice
// from L1/L2 (two-pass statistics at the memory cost of one pass).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../inplace_abn.h"

namespace inplace_abn {
namespace {

// `omp simd` as _Pragma so it can sit inside AT_DISPATCH lambdas (a #pragma cannot be a macro argument).
#define IABN_SIMD _Pragma("omp simd")
#define IABN_PRAGMA(text) _Pragma(#text)
#define IABN_SIMD_REDUCE_SUM(...) IABN_PRAGMA(omp simd reduction(+ : __VA_ARGS__))

// The hot loops are compiled once per x86-64 level (AVX-512, AVX2+FMA, baseline SSE2) and the loader
// picks the best for the running CPU (GCC function multi-versioning through an ifunc): the binary stays
// portable, and a memory-bound pass is not left compute-bound on 4-wide SSE2 (2-3x slower measured).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define IABN_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), noinline))
#else
#define IABN_HOT C10_NOINLINE
#endif

constexpr int64_t kBlock = 4096;  // elements per work unit (16 KiB of float32)

struct Geometry {
  Layout layout;
  int64_t N, C, S;        // x viewed as (N, C, S)
  int64_t rows;           // NCS: N * C; NSC: N * S
  int64_t per_unit;       // NCS: elements of a row per unit; NSC: rows per unit
  int64_t units_per_row;  // NCS only
  int64_t units;
};

Geometry geometry(const at::Tensor& x) {
  Geometry g;
  g.layout = native_layout(x).value();
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = g.N * g.C == 0 ? 0 : x.numel() / (g.N * g.C);
  if (g.layout == Layout::NCS) {
    g.rows = g.N * g.C;
    g.per_unit = std::min<int64_t>(kBlock, std::max<int64_t>(1, g.S));
    g.units_per_row = (g.S + g.per_unit - 1) / g.per_unit;
    g.units = g.rows * g.units_per_row;
  } else {
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

// Unit u of an NCS walk: one run of `len` elements of one channel. Of an NSC walk: `rows` whole rows.
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

// Per-channel vector as opmath values on the host (C is small). Read element by element, whatever the
// dtype and stride: a conversion through ATen (.to / .contiguous) costs an op call per vector, which
// shows on small layers.
template <typename opmath_t>
std::vector<opmath_t> channel_values(const std::optional<at::Tensor>& v, int64_t C) {
  if (!v.has_value() || !v->defined()) return {};
  std::vector<opmath_t> out(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v->scalar_type(), "inplace_abn_channel_values", [&] {
    const scalar_t* p = v->const_data_ptr<scalar_t>();
    const int64_t stride = v->stride(0);
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<opmath_t>(p[c * stride]);
    }
  });
  return out;
}

template <typename T>
const T* ptr_or_null(const std::vector<T>& v) {
  return v.empty() ? nullptr : v.data();
}

// Element i of the residual in the compute type, or 0 when the kernel is instantiated without one (the
// pointer is then null and never read).
template <bool R, typename T, typename scalar_t>
inline T residual_at(const scalar_t* __restrict__ r, int64_t i) {
  if constexpr (R) {
    return static_cast<T>(r[i]);
  } else {
    return T(0);
  }
}

// The residual pointer of a run starting at `off` (null without a residual).
template <bool R, typename scalar_t>
inline const scalar_t* residual_run(const scalar_t* r, int64_t off) {
  return R ? r + off : nullptr;
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

// NB: the loops live in out-of-line functions (IABN_HOT): inlined into the AT_DISPATCH lambdas, GCC 12
// dropped their `omp simd` reductions and emitted scalar loops with mispredicted branches (4-8x slower).

// Mean and M2 of one contiguous block, two passes: the block is still in L1/L2 for the second one, and
// centring first avoids the cancellation of sum-of-squares formulas.
template <typename scalar_t, typename T>
IABN_HOT void block_moments(const scalar_t* __restrict__ x, int64_t len, T& mean, T& m2) {
  T s = 0;
  IABN_SIMD_REDUCE_SUM(s)
  for (int64_t i = 0; i < len; ++i) s += static_cast<T>(x[i]);
  const T m = s / static_cast<T>(len);
  T s2 = 0;
  IABN_SIMD_REDUCE_SUM(s2)
  for (int64_t i = 0; i < len; ++i) {
    const T d = static_cast<T>(x[i]) - m;
    s2 += d * d;
  }
  mean = m;
  m2 = s2;
}

// Per-channel mean and M2 of `rows` consecutive NSC rows of C channels (two passes, as above).
template <typename scalar_t, typename T>
IABN_HOT void rows_moments(
    const scalar_t* __restrict__ x, int64_t rows, int64_t C, T* __restrict__ mean, T* __restrict__ m2) {
  for (int64_t row = 0; row < rows; ++row) {
    const scalar_t* __restrict__ q = x + row * C;
    IABN_SIMD
    for (int64_t c = 0; c < C; ++c) mean[c] += static_cast<T>(q[c]);
  }
  const T inv_rows = T(1) / static_cast<T>(rows);
  for (int64_t c = 0; c < C; ++c) mean[c] *= inv_rows;
  for (int64_t row = 0; row < rows; ++row) {
    const scalar_t* __restrict__ q = x + row * C;
    IABN_SIMD
    for (int64_t c = 0; c < C; ++c) {
      const T d = static_cast<T>(q[c]) - mean[c];
      m2[c] += d * d;
    }
  }
}

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
          opmath_t m, m2;
          block_moments<scalar_t, opmath_t>(xp + r.offset, r.len, m, m2);
          part_n[u] = static_cast<double>(r.len);
          part_mean[u] = static_cast<double>(m);
          part_m2[u] = static_cast<double>(m2);
        } else {
          const NscRows r = nsc_rows(g, u);
          acc.assign(C, opmath_t(0));
          acc2.assign(C, opmath_t(0));
          rows_moments<scalar_t, opmath_t>(xp + r.first_row * C, r.rows, C, acc.data(), acc2.data());
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
    // The merge is cheap: it only gets threads when there are many partial results per channel.
    const int64_t merges_per_channel = g.layout == Layout::NCS ? g.N * g.units_per_row : g.units;
    at::parallel_for(
        0, C, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, merges_per_channel)), [&](int64_t begin, int64_t end) {
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
// absmax: per-channel max |x|, NaN if the channel holds one (as torch.amax).
// The vector loops take a plain max (which skips NaN) and add v - v into a probe, which only NaN and inf
// make non-zero (NaN); a block whose probe fires is rescanned by the scalar NaN-sticky loop. A NaN test
// inside the vector loop kept it from vectorising (3.6x slower than a sum over the same data).

template <typename T>
inline T max_nan(T a, T b) {
  return (b > a || b != b) ? b : a;
}

template <typename scalar_t, typename T>
IABN_HOT T block_absmax(const scalar_t* __restrict__ x, int64_t len) {
  T m = 0, probe = 0;
  IABN_PRAGMA(omp simd reduction(max : m) reduction(+ : probe))
  for (int64_t i = 0; i < len; ++i) {
    const T v = static_cast<T>(x[i]);
    m = std::max(m, std::fabs(v));
    probe += v - v;
  }
  if (probe == T(0)) return m;
  for (int64_t i = 0; i < len; ++i) m = max_nan(m, std::fabs(static_cast<T>(x[i])));
  return m;
}

// Max |x| of `rows` consecutive NSC rows into acc (C,), NaN-sticky (same scheme as block_absmax).
template <typename scalar_t, typename T>
IABN_HOT void rows_absmax(const scalar_t* __restrict__ x, int64_t rows, int64_t C, T* __restrict__ acc) {
  T probe = 0;
  for (int64_t row = 0; row < rows; ++row) {
    const scalar_t* __restrict__ q = x + row * C;
    IABN_SIMD_REDUCE_SUM(probe)
    for (int64_t c = 0; c < C; ++c) {
      const T v = static_cast<T>(q[c]);
      acc[c] = std::max(acc[c], std::fabs(v));
      probe += v - v;
    }
  }
  if (probe == T(0)) return;
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t c = 0; c < C; ++c) acc[c] = max_nan(acc[c], std::fabs(static_cast<T>(x[row * C + c])));
  }
}

at::Tensor absmax_cpu(const at::Tensor& x_in) {
  check_input(x_in, "x");
  const auto x = to_native(x_in);
  const int64_t C = x.size(1);
  auto out = at::zeros({C}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  if (x.numel() == 0) return out;
  const Geometry g = geometry(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_absmax", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t slots = g.layout == Layout::NCS ? 1 : C;
    std::vector<opmath_t> part(g.units * slots, opmath_t(0));
    at::parallel_for(0, g.units, grain_units(g), [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        if (g.layout == Layout::NCS) {
          const NcsRun r = ncs_run(g, u);
          part[u] = block_absmax<scalar_t, opmath_t>(xp + r.offset, r.len);
        } else {
          const NscRows r = nsc_rows(g, u);
          rows_absmax<scalar_t, opmath_t>(xp + r.first_row * C, r.rows, C, part.data() + u * C);
        }
      }
    });
    opmath_t* op = out.mutable_data_ptr<opmath_t>();
    for (int64_t u = 0; u < g.units; ++u) {
      for (int64_t k = 0; k < slots; ++k) {
        const int64_t c = g.layout == Layout::NCS ? ncs_run(g, u).channel : k;
        op[c] = max_nan(op[c], part[u * slots + k]);
      }
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// Per-channel constants, stored as structure-of-arrays: NSC loops index them by c and vectorise over
// channels; NCS loops load one channel's values into registers. Every loop below takes its pointers
// __restrict__ and its scalars by value (see the aliasing note in activation.h).

template <typename T>
struct ChannelAffine {
  std::vector<T> gamma, inv_gamma, beta;
  ChannelAffine(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t C, double eps)
      : gamma(C), inv_gamma(C), beta(C) {
    const auto w = channel_values<T>(weight, C);
    const auto b = channel_values<T>(bias, C);
    for (int64_t c = 0; c < C; ++c) {
      const auto a = affine_params<T>(ptr_or_null(w), ptr_or_null(b), c, static_cast<T>(eps));
      gamma[c] = a.gamma;
      inv_gamma[c] = a.inv_gamma;
      beta[c] = a.beta;
    }
  }
  AffineParams<T> at(int64_t c) const { return {gamma[c], inv_gamma[c], beta[c]}; }
};

// Runs op.ncs(offset, len, channel) or op.nsc_rows(offset, rows) over the units [begin, end).
template <typename Op>
void for_each_run(const Geometry& g, int64_t begin, int64_t end, const Op& op) {
  for (int64_t u = begin; u < end; ++u) {
    if (g.layout == Layout::NCS) {
      const NcsRun r = ncs_run(g, u);
      op.ncs(r.offset, r.len, r.channel);
    } else {
      const NscRows r = nsc_rows(g, u);
      op.nsc_rows(r.first_row * g.C, r.rows);
    }
  }
}

template <Activation A, bool R, typename scalar_t, typename T>
struct ForwardOp {
  scalar_t* x;
  const scalar_t* r;  // residual (R only)
  const T* scale;
  const T* shift;
  int64_t C;
  ActivationParams<T> p;

  IABN_HOT void ncs(int64_t off, int64_t len, int64_t c) const {
    scalar_t* __restrict__ xp = x + off;
    const scalar_t* __restrict__ rp = residual_run<R>(r, off);
    const T k = scale[c], b = shift[c];
    const ActivationParams<T> q = p;
    IABN_SIMD
    for (int64_t i = 0; i < len; ++i) {
      xp[i] = static_cast<scalar_t>(forward_element<A, T>(static_cast<T>(xp[i]), k, b, residual_at<R, T>(rp, i), q));
    }
  }
  // NB: one out-of-line (multi-versioned) call per block of rows, not per row: a row of C channels is
  // only a few vectors long, and a call per row made channels_last 2x slower than contiguous.
  IABN_HOT void nsc_rows(int64_t off, int64_t rows) const {
    for (int64_t r = 0; r < rows; ++r) {
      nsc_row(off + r * C);
    }
  }
  void nsc_row(int64_t off) const {
    scalar_t* __restrict__ xp = x + off;
    const scalar_t* __restrict__ rp = residual_run<R>(r, off);
    const T* __restrict__ k = scale;
    const T* __restrict__ b = shift;
    const ActivationParams<T> q = p;
    IABN_SIMD
    for (int64_t c = 0; c < C; ++c) {
      xp[c] =
          static_cast<scalar_t>(forward_element<A, T>(static_cast<T>(xp[c]), k[c], b[c], residual_at<R, T>(rp, c), q));
    }
  }
};

void forward_cpu(
    at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view activation, double activation_param,
    const std::optional<at::Tensor>& residual) {
  const Activation act = check_forward_args(x, mean, var, weight, bias, eps, activation, activation_param);
  const bool has_r = check_residual(residual, x, "x");
  if (x.numel() == 0) return;
  // A layout the kernels cannot walk is computed in a contiguous copy and written back: the op's
  // contract (y overwrites x) holds for every stride pattern. The residual is read in x's layout.
  at::Tensor work = to_native(x);
  const at::Tensor r = residual_like(residual, has_r, work);
  const Geometry g = geometry(work);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = g.C;
    const auto m = channel_values<opmath_t>(mean, C);
    const auto v = channel_values<opmath_t>(var, C);
    const ChannelAffine<opmath_t> aff(weight, bias, C, eps);
    // y = act(scale * x + shift) with scale = gamma * rstd, shift = beta - mean * scale.
    std::vector<opmath_t> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t rstd = opmath_t(1) / std::sqrt(v[c] + static_cast<opmath_t>(eps));
      scale[c] = aff.gamma[c] * rstd;
      shift[c] = aff.beta[c] - m[c] * scale[c];
    }
    const auto p = activation_params<opmath_t>(act, activation_param);
    scalar_t* xp = work.mutable_data_ptr<scalar_t>();
    const scalar_t* rp = has_r ? r.const_data_ptr<scalar_t>() : nullptr;
    dispatch_activation(act, [&](auto A) {
      dispatch_residual(has_r, [&](auto R) {
        const ForwardOp<decltype(A)::value, decltype(R)::value, scalar_t, opmath_t> op{xp,           rp, scale.data(),
                                                                                       shift.data(), C,  p};
        at::parallel_for(0, g.units, grain_units(g), [&](int64_t begin, int64_t end) {
          for_each_run(g, begin, end, op);
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

template <Activation A, bool R, typename scalar_t, typename T>
IABN_HOT void reduce_ncs(
    const scalar_t* __restrict__ y, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ r, int64_t len,
    const AffineParams<T> a, const ActivationParams<T> p, T& out_dz, T& out_dz_xhat) {
  T s1 = 0, s2 = 0;
  IABN_SIMD_REDUCE_SUM(s1, s2)
  for (int64_t i = 0; i < len; ++i) {
    backward_reduce_element<A, T>(static_cast<T>(y[i]), static_cast<T>(dy[i]), residual_at<R, T>(r, i), a, p, s1, s2);
  }
  out_dz = s1;
  out_dz_xhat = s2;
}

template <Activation A, bool R, typename scalar_t, typename T>
inline void reduce_nsc_row(
    const scalar_t* __restrict__ y, const scalar_t* __restrict__ dy, const scalar_t* __restrict__ r, int64_t C,
    const T* __restrict__ gamma, const T* __restrict__ inv_gamma, const T* __restrict__ beta,
    const ActivationParams<T> p, T* __restrict__ acc_dz, T* __restrict__ acc_dz_xhat) {
  IABN_SIMD
  for (int64_t c = 0; c < C; ++c) {
    T s1 = 0, s2 = 0;
    backward_reduce_element<A, T>(
        static_cast<T>(y[c]), static_cast<T>(dy[c]), residual_at<R, T>(r, c), {gamma[c], inv_gamma[c], beta[c]}, p, s1,
        s2);
    acc_dz[c] += s1;
    acc_dz_xhat[c] += s2;
  }
}

// `rows` consecutive NSC rows in one out-of-line call (see ForwardOp::nsc_rows).
template <Activation A, bool R, typename scalar_t, typename T>
IABN_HOT void reduce_nsc_rows(
    const scalar_t* y, const scalar_t* dy, const scalar_t* res, int64_t rows, int64_t C, const ChannelAffine<T>* aff,
    const ActivationParams<T> p, T* acc_dz, T* acc_dz_xhat) {
  for (int64_t r = 0; r < rows; ++r) {
    reduce_nsc_row<A, R, scalar_t, T>(
        y + r * C, dy + r * C, residual_run<R>(res, r * C), C, aff->gamma.data(), aff->inv_gamma.data(),
        aff->beta.data(), p, acc_dz, acc_dz_xhat);
  }
}

// Per-channel sums of dz and dz * x_hat over native-layout (y, dy), merged in double on the host.
struct ChannelSums {
  std::vector<double> dz, dz_xhat;
};

// `r`: the residual in y's layout, or undefined.
ChannelSums reduce_sums(
    const at::Tensor& y, const at::Tensor& dy, const at::Tensor& res, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, Activation act, double activation_param) {
  const int64_t C = y.size(1);
  ChannelSums sums{std::vector<double>(C, 0.0), std::vector<double>(C, 0.0)};
  if (y.numel() == 0) return sums;
  const Geometry g = geometry(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "inplace_abn_backward_reduce", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const ChannelAffine<opmath_t> aff(weight, bias, C, eps);
    const auto p = activation_params<opmath_t>(act, activation_param);
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    // Partial sums per unit (one per channel for NSC units), merged in double below.
    const int64_t slots = g.layout == Layout::NCS ? 1 : C;
    std::vector<double> part_dz(g.units * slots), part_dz_xhat(g.units * slots);
    dispatch_activation(act, [&](auto A) {
      dispatch_residual(res.defined(), [&](auto R) {
        constexpr Activation kA = decltype(A)::value;
        constexpr bool kR = decltype(R)::value;
        at::parallel_for(0, g.units, grain_units(g), [&](int64_t begin, int64_t end) {
          std::vector<opmath_t> acc1, acc2;
          for (int64_t u = begin; u < end; ++u) {
            if (g.layout == Layout::NCS) {
              const NcsRun r = ncs_run(g, u);
              opmath_t s1, s2;
              reduce_ncs<kA, kR, scalar_t, opmath_t>(
                  yp + r.offset, dyp + r.offset, residual_run<kR>(rp, r.offset), r.len, aff.at(r.channel), p, s1, s2);
              part_dz[u] = static_cast<double>(s1);
              part_dz_xhat[u] = static_cast<double>(s2);
            } else {
              const NscRows r = nsc_rows(g, u);
              acc1.assign(C, opmath_t(0));
              acc2.assign(C, opmath_t(0));
              reduce_nsc_rows<kA, kR, scalar_t, opmath_t>(
                  yp + r.first_row * C, dyp + r.first_row * C, residual_run<kR>(rp, r.first_row * C), r.rows, C, &aff,
                  p, acc1.data(), acc2.data());
              for (int64_t c = 0; c < C; ++c) {
                part_dz[u * C + c] = static_cast<double>(acc1[c]);
                part_dz_xhat[u * C + c] = static_cast<double>(acc2[c]);
              }
            }
          }
        });
      });
    });
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
      sums.dz[c] = s1;
      sums.dz_xhat[c] = s2;
    }
  });
  return sums;
}

// A (C,) tensor of `dtype` holding value(c): the per-channel results are formed on the host, so this
// replaces a chain of small ATen ops (division, sign, cast) by one allocation.
template <typename F>
at::Tensor channel_tensor(int64_t C, at::ScalarType dtype, const at::Tensor& like, F&& value) {
  auto t = at::empty({C}, like.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "inplace_abn_channel_tensor", [&] {
    scalar_t* p = t.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      p[c] = static_cast<scalar_t>(value(c));
    }
  });
  return t;
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cpu(
    const at::Tensor& y_in, const at::Tensor& dy_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view activation, double activation_param,
    const std::optional<at::Tensor>& residual) {
  const Activation act = check_backward_reduce_args(y_in, dy_in, weight, bias, eps, activation, activation_param);
  const bool has_r = check_residual(residual, y_in, "y");
  const auto y = to_native(y_in);
  const auto dy = to_native(dy_in, native_layout(y));
  const ChannelSums s = reduce_sums(y, dy, residual_like(residual, has_r, y), weight, bias, eps, act, activation_param);
  const auto op_type = at::toOpMathType(y.scalar_type());
  const int64_t C = y.size(1);
  return {
      channel_tensor(
          C, op_type, y,
          [&](int64_t c) {
            return s.dz[c];
          }),
      channel_tensor(C, op_type, y, [&](int64_t c) {
        return s.dz_xhat[c];
      })};
}

// ------------------------------------------------------------------------------------------------
// backward: dx from (y, dy) and the per-channel means of the reduction; dx is the only allocation.

// R: a residual is read, and its gradient dz written in the same pass.
template <Activation A, bool R, typename scalar_t, typename T>
struct BackwardOp {
  const scalar_t* y;
  const scalar_t* dy;
  const scalar_t* r;  // residual (R only)
  scalar_t* dx;
  scalar_t* dr;  // dL/dresidual = dz (R only)
  const ChannelAffine<T>* aff;
  const T* gamma_rstd;
  const T* mean_dz;
  const T* mean_dz_xhat;
  int64_t C;
  ActivationParams<T> p;

  IABN_HOT void ncs(int64_t off, int64_t len, int64_t c) const {
    const scalar_t* __restrict__ yp = y + off;
    const scalar_t* __restrict__ dyp = dy + off;
    const scalar_t* __restrict__ rp = residual_run<R>(r, off);
    scalar_t* __restrict__ dxp = dx + off;
    scalar_t* __restrict__ drp = R ? dr + off : nullptr;
    const AffineParams<T> a = aff->at(c);
    const T k = gamma_rstd[c], m1 = mean_dz[c], m2 = mean_dz_xhat[c];
    const ActivationParams<T> q = p;
    IABN_SIMD
    for (int64_t i = 0; i < len; ++i) {
      T dz;
      dxp[i] = static_cast<scalar_t>(backward_element<A, T>(
          static_cast<T>(yp[i]), static_cast<T>(dyp[i]), residual_at<R, T>(rp, i), a, q, k, m1, m2, dz));
      if constexpr (R) drp[i] = static_cast<scalar_t>(dz);
    }
  }
  // NB: one out-of-line (multi-versioned) call per block of rows, not per row: a row of C channels is
  // only a few vectors long, and a call per row made channels_last 2x slower than contiguous.
  IABN_HOT void nsc_rows(int64_t off, int64_t rows) const {
    for (int64_t r = 0; r < rows; ++r) {
      nsc_row(off + r * C);
    }
  }
  void nsc_row(int64_t off) const {
    const scalar_t* __restrict__ yp = y + off;
    const scalar_t* __restrict__ dyp = dy + off;
    const scalar_t* __restrict__ rp = residual_run<R>(r, off);
    scalar_t* __restrict__ dxp = dx + off;
    scalar_t* __restrict__ drp = R ? dr + off : nullptr;
    const T* __restrict__ g = aff->gamma.data();
    const T* __restrict__ ig = aff->inv_gamma.data();
    const T* __restrict__ b = aff->beta.data();
    const T* __restrict__ k = gamma_rstd;
    const T* __restrict__ m1 = mean_dz;
    const T* __restrict__ m2 = mean_dz_xhat;
    const ActivationParams<T> q = p;
    IABN_SIMD
    for (int64_t c = 0; c < C; ++c) {
      T dz;
      dxp[c] = static_cast<scalar_t>(backward_element<A, T>(
          static_cast<T>(yp[c]), static_cast<T>(dyp[c]), residual_at<R, T>(rp, c), {g[c], ig[c], b[c]}, q, k[c], m1[c],
          m2[c], dz));
      if constexpr (R) drp[c] = static_cast<scalar_t>(dz);
    }
  }
};

// (dx, grad_residual) from native-layout (y, dy); `means` = (mean_dz, mean_dz_xhat) per channel, or null in
// eval mode (the statistics are constants there, so both means are 0 and dx = gamma * rstd * dz).
// With a residual `res` (y's layout), grad_residual = dz is written in the same pass (else it is empty).
std::tuple<at::Tensor, at::Tensor> backward_dx(
    const at::Tensor& y_in, const at::Tensor& y, const at::Tensor& dy, const at::Tensor& res, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const ChannelSums* means,
    double eps, Activation act, double activation_param) {
  const bool has_r = res.defined();
  if (y.numel() == 0) return {at::empty_like(y_in), has_r ? at::empty_like(y_in) : no_grad_residual(y_in)};
  Output dx = make_output(y_in, y);
  const at::Tensor& out = dx.work;
  const at::Tensor none = no_grad_residual(y_in);
  Output dr = has_r ? make_output(y_in, y) : Output{none, none};
  const Geometry g = geometry(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "inplace_abn_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = g.C;
    const auto v = channel_values<opmath_t>(var, C);
    const ChannelAffine<opmath_t> aff(weight, bias, C, eps);
    std::vector<opmath_t> m1(C, opmath_t(0)), m2(C, opmath_t(0)), gamma_rstd(C);
    for (int64_t c = 0; c < C; ++c) {
      if (means != nullptr) {
        m1[c] = static_cast<opmath_t>(means->dz[c]);
        m2[c] = static_cast<opmath_t>(means->dz_xhat[c]);
      }
      gamma_rstd[c] = aff.gamma[c] / std::sqrt(v[c] + static_cast<opmath_t>(eps));
    }
    const auto p = activation_params<opmath_t>(act, activation_param);
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* rp = has_r ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = out.mutable_data_ptr<scalar_t>();
    scalar_t* drp = has_r ? dr.work.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_activation(act, [&](auto A) {
      dispatch_residual(has_r, [&](auto R) {
        const BackwardOp<std::decay_t<decltype(A)>::value, decltype(R)::value, scalar_t, opmath_t> op{
            yp, dyp, rp, dxp, drp, &aff, gamma_rstd.data(), m1.data(), m2.data(), C, p};
        at::parallel_for(0, g.units, grain_units(g), [&](int64_t begin, int64_t end) {
          for_each_run(g, begin, end, op);
        });
      });
    });
  });
  dx.finish();
  dr.finish();
  return {dx.result, dr.result};
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& y_in, const at::Tensor& dy_in, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean_dz,
    const std::optional<at::Tensor>& mean_dz_xhat, double eps, c10::string_view activation, double activation_param,
    const std::optional<at::Tensor>& residual) {
  const auto [act, has_dz] =
      check_backward_args(y_in, dy_in, var, weight, bias, mean_dz, mean_dz_xhat, eps, activation, activation_param);
  const bool has_r = check_residual(residual, y_in, "y");
  const auto y = to_native(y_in);
  const auto dy = to_native(dy_in, native_layout(y));
  const auto r = residual_like(residual, has_r, y);
  if (!has_dz) return backward_dx(y_in, y, dy, r, var, weight, bias, nullptr, eps, act, activation_param);
  const int64_t C = y.size(1);
  const auto m1 = channel_values<double>(mean_dz, C);
  const auto m2 = channel_values<double>(mean_dz_xhat, C);
  const ChannelSums means{m1, m2};
  return backward_dx(y_in, y, dy, r, var, weight, bias, &means, eps, act, activation_param);
}

// ------------------------------------------------------------------------------------------------
// invert: x_hat from y (diagnostics). Returned in y's dtype and strides.

template <Activation A, bool R, typename scalar_t, typename T>
struct InvertOp {
  const scalar_t* y;
  const scalar_t* r;  // residual (R only)
  scalar_t* out;
  const ChannelAffine<T>* aff;
  int64_t C;
  ActivationParams<T> p;

  IABN_HOT void ncs(int64_t off, int64_t len, int64_t c) const {
    const scalar_t* __restrict__ yp = y + off;
    const scalar_t* __restrict__ rp = residual_run<R>(r, off);
    scalar_t* __restrict__ op = out + off;
    const AffineParams<T> a = aff->at(c);
    const ActivationParams<T> q = p;
    IABN_SIMD
    for (int64_t i = 0; i < len; ++i) {
      op[i] = static_cast<scalar_t>(invert_element<A, T>(static_cast<T>(yp[i]), residual_at<R, T>(rp, i), a, q));
    }
  }
  // NB: one out-of-line (multi-versioned) call per block of rows, not per row: a row of C channels is
  // only a few vectors long, and a call per row made channels_last 2x slower than contiguous.
  IABN_HOT void nsc_rows(int64_t off, int64_t rows) const {
    for (int64_t r = 0; r < rows; ++r) {
      nsc_row(off + r * C);
    }
  }
  void nsc_row(int64_t off) const {
    const scalar_t* __restrict__ yp = y + off;
    const scalar_t* __restrict__ rp = residual_run<R>(r, off);
    scalar_t* __restrict__ op = out + off;
    const T* __restrict__ g = aff->gamma.data();
    const T* __restrict__ ig = aff->inv_gamma.data();
    const T* __restrict__ b = aff->beta.data();
    const ActivationParams<T> q = p;
    IABN_SIMD
    for (int64_t c = 0; c < C; ++c) {
      op[c] = static_cast<scalar_t>(
          invert_element<A, T>(static_cast<T>(yp[c]), residual_at<R, T>(rp, c), {g[c], ig[c], b[c]}, q));
    }
  }
};

at::Tensor invert_cpu(
    const at::Tensor& y_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    c10::string_view activation, double activation_param, const std::optional<at::Tensor>& residual) {
  const Activation act = check_invert_args(y_in, weight, bias, eps, activation, activation_param);
  const bool has_r = check_residual(residual, y_in, "y");
  if (y_in.numel() == 0) return at::empty_like(y_in);
  const auto y = to_native(y_in);
  const auto r = residual_like(residual, has_r, y);
  Output xhat = make_output(y_in, y);
  const at::Tensor& out = xhat.work;
  const Geometry g = geometry(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "inplace_abn_invert", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const ChannelAffine<opmath_t> aff(weight, bias, g.C, eps);
    const auto p = activation_params<opmath_t>(act, activation_param);
    const scalar_t* rp = has_r ? r.const_data_ptr<scalar_t>() : nullptr;
    dispatch_activation(act, [&](auto A) {
      dispatch_residual(has_r, [&](auto R) {
        const InvertOp<decltype(A)::value, decltype(R)::value, scalar_t, opmath_t> op{
            y.const_data_ptr<scalar_t>(), rp, out.mutable_data_ptr<scalar_t>(), &aff, g.C, p};
        at::parallel_for(0, g.units, grain_units(g), [&](int64_t begin, int64_t end) {
          for_each_run(g, begin, end, op);
        });
      });
    });
  });
  xhat.finish();
  return xhat.result;
}

// ------------------------------------------------------------------------------------------------
// Single-process training: the two passes of each direction behind one dispatcher call.

std::tuple<at::Tensor, at::Tensor> forward_train_cpu(
    at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps, c10::string_view activation, double activation_param, const std::optional<at::Tensor>& residual) {
  const bool update = check_running_stats(running_mean, running_var, momentum, x);
  check_residual(residual, x, "x");
  auto [mean, var] = statistics_cpu(x);
  forward_cpu(x, mean, var, weight, bias, eps, activation, activation_param, residual);
  if (update) {
    // C values: a host loop instead of the three ATen ops (lerp, scale, lerp) of the Python update.
    const int64_t C = x.size(1);
    const double unbias = static_cast<double>(x.numel() / C) / static_cast<double>(x.numel() / C - 1);
    const auto m = channel_values<double>(mean, C);
    const auto v = channel_values<double>(var, C);
    for (const auto& [running, batch, factor] :
         {std::tuple(&*running_mean, &m, 1.0), std::tuple(&*running_var, &v, unbias)}) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running->scalar_type(), "inplace_abn_running", [&] {
        scalar_t* rp = running->mutable_data_ptr<scalar_t>();
        const int64_t stride = running->stride(0);
        for (int64_t c = 0; c < C; ++c) {
          rp[c * stride] = static_cast<scalar_t>(
              running_update<double>(static_cast<double>(rp[c * stride]), (*batch)[c] * factor, momentum));
        }
      });
    }
  }
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_train_cpu(
    const at::Tensor& y_in, const at::Tensor& dy_in, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view activation, double activation_param,
    const std::optional<at::Tensor>& residual) {
  const Activation act =
      check_backward_args(y_in, dy_in, var, weight, bias, std::nullopt, std::nullopt, eps, activation, activation_param)
          .first;
  const bool has_r = check_residual(residual, y_in, "y");
  const auto y = to_native(y_in);
  const auto dy = to_native(dy_in, native_layout(y));
  const auto r = residual_like(residual, has_r, y);
  const int64_t C = y.size(1);
  const ChannelSums sums = reduce_sums(y, dy, r, weight, bias, eps, act, activation_param);
  const double count = static_cast<double>(y.numel() / std::max<int64_t>(1, C));
  ChannelSums means = sums;
  for (int64_t c = 0; c < C; ++c) {
    means.dz[c] /= count;
    means.dz_xhat[c] /= count;
  }
  auto [dx, grad_residual] = backward_dx(y_in, y, dy, r, var, weight, bias, &means, eps, act, activation_param);
  // The parameter gradients, in the parameters' dtypes (the opmath dtype without affine).
  const auto op_type = at::toOpMathType(y.scalar_type());
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  const auto w = channel_values<double>(weight, C);
  auto grad_weight = channel_tensor(C, has_w ? weight->scalar_type() : op_type, y, [&](int64_t c) {
    return has_w ? weight_grad<double>(sums.dz_xhat[c], w[c]) : sums.dz_xhat[c];
  });
  auto grad_bias = channel_tensor(C, has_b ? bias->scalar_type() : op_type, y, [&](int64_t c) {
    return sums.dz[c];
  });
  return std::make_tuple(dx, grad_weight, grad_bias, grad_residual);
}

}  // namespace

// Registers the CPU implementations of the schemas declared in src/ops.cpp.
TORCH_LIBRARY_IMPL(inplace_abn, CPU, m) {
  m.impl("statistics", &statistics_cpu);
  m.impl("absmax", &absmax_cpu);
  m.impl("forward_", &forward_cpu);
  m.impl("backward_reduce", &backward_reduce_cpu);
  m.impl("backward", &backward_cpu);
  m.impl("invert", &invert_cpu);
  m.impl("forward_train_", &forward_train_cpu);
  m.impl("backward_train", &backward_train_cpu);
}

}  // namespace inplace_abn
