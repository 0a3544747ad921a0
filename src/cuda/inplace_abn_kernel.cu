// CUDA kernels of the inplace_abn ops. The per-element math is src/activation.h, the same code the CPU
// kernels run (and the CPU test-suite checks everywhere); argument checks and layouts come from
// src/inplace_abn.h. This file decides how threads walk the tensor.
//
// Work decomposition (x viewed as (N, C, S), see Layout in inplace_abn.h):
//   Reductions (statistics, absmax, backward_reduce): every thread owns ONE channel, so per-channel constants
//   are computed once per thread. Grid = (channel tiles) x (G blocks per channel tile), G chosen so the
//   whole grid fills the GPU even when C is small and N*S is large; each block merges its threads in
//   shared memory and writes one partial per channel, and a second kernel merges the G partials
//   (Welford / Chan for the statistics, a NaN-sticky max for absmax, plain sums for the gradients).
//   No atomics: deterministic.
//     NCS: block (1, 256); threads of a block walk consecutive s of a row -> coalesced loads.
//     NSC: block (32, 8); threadIdx.x walks 32 consecutive channels of a row -> coalesced loads.
//   Elementwise passes (forward_, backward, invert): a block walks one row (NCS: S elements of one
//   channel; NSC: the C channels of one pixel) with consecutive threads on consecutive addresses.
//   For NSC with few channels (C << 256) most threads of a block idle: correct, not fast; documented.
// Residual fusion (src/ops.cpp): the residual r is brought into x's / y's native layout, so it is read at
// the element's own offset, in the pass that needs it (forward_, the backward_reduce reduction, backward's
// dx pass, invert); backward's dx pass also writes grad_residual = dz in that same pass. Kernels are
// instantiated with and without a residual (R): a layer without one loads and stores nothing more than
// before the fusion existed.
// Indices and sizes are int64 throughout (tensors beyond 2^31 elements work).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../inplace_abn.h"

namespace inplace_abn {
namespace {

constexpr int kReduceThreads = 256;  // NCS reduction block: (1, 256)
constexpr int kTileChannels = 32;    // NSC reduction block: (32, 8)
constexpr int kTileRows = 8;
constexpr int kRowThreads = 256;                // elementwise block
constexpr int64_t kChunk = 4 * kReduceThreads;  // NCS reduction: elements of a row per work unit

__device__ inline float rsqrt_acc(float v) { return ::rsqrtf(v); }
__device__ inline double rsqrt_acc(double v) { return ::rsqrt(v); }

int multiprocessors(const at::Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()));
  return std::max(sms, 1);
}

// Per-channel vector in the opmath dtype, contiguous (a no-op for the usual float32 parameters).
template <typename acc_t>
at::Tensor as_acc(const at::Tensor& v) {
  return v.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

template <typename acc_t>
const acc_t* optional_ptr(const at::Tensor& v) {
  return v.defined() ? v.const_data_ptr<acc_t>() : nullptr;
}

template <typename acc_t>
at::Tensor optional_acc(const std::optional<at::Tensor>& v) {
  return v.has_value() && v->defined() ? as_acc<acc_t>(*v) : at::Tensor();
}

// Element i of the residual in the compute type, or 0 when the kernel is instantiated without one (the
// pointer is then null; R is a constant, so the load is compiled out).
template <bool R, typename acc_t, typename scalar_t>
__device__ inline acc_t residual_at(const scalar_t* r, int64_t i) {
  return R ? static_cast<acc_t>(r[i]) : acc_t(0);
}

template <typename scalar_t>
const scalar_t* residual_ptr(const at::Tensor& r) {
  return r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
}

struct Shape {
  int64_t N, C, S;
  bool nsc;
};

Shape shape_of(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = N * C == 0 ? 0 : x.numel() / (N * C);
  return {N, C, S, native_layout(x).value() == Layout::NSC};
}

// ------------------------------------------------------------------------------------------------
// Per-channel reductions. An Op provides:
//   State                       the partial result (plain struct, lives in shared memory)
//   Channel channel(c)          per-channel constants, computed once per thread
//   void add(State&, offset, const Channel&)
//   static State merge(State, State), identity()

template <typename scalar_t, typename acc_t>
struct StatisticsOp {
  const scalar_t* x;
  struct State {
    acc_t mean, m2;
    int64_t n;
  };
  struct Channel {};
  __device__ Channel channel(int64_t) const { return {}; }
  __device__ static State identity() { return {acc_t(0), acc_t(0), 0}; }
  // Welford's update: numerically stable in one pass.
  __device__ void add(State& s, int64_t offset, const Channel&) const {
    const acc_t v = static_cast<acc_t>(x[offset]);
    s.n += 1;
    const acc_t d = v - s.mean;
    s.mean += d / static_cast<acc_t>(s.n);
    s.m2 += d * (v - s.mean);
  }
  // Chan et al.'s pairwise merge.
  __device__ static State merge(const State& a, const State& b) {
    if (b.n == 0) return a;
    if (a.n == 0) return b;
    const int64_t n = a.n + b.n;
    const acc_t d = b.mean - a.mean;
    const acc_t wb = static_cast<acc_t>(b.n) / static_cast<acc_t>(n);
    return {a.mean + d * wb, a.m2 + b.m2 + d * d * static_cast<acc_t>(a.n) * wb, n};
  }
};

// max |x|, NaN-sticky like torch.amax: `v > m` alone would drop a NaN (every comparison with it is false).
template <typename scalar_t, typename acc_t>
struct AbsmaxOp {
  const scalar_t* x;
  struct State {
    acc_t m;
  };
  struct Channel {};
  __device__ Channel channel(int64_t) const { return {}; }
  __device__ static State identity() { return {acc_t(0)}; }
  __device__ static acc_t max_nan(acc_t a, acc_t b) { return (b > a || b != b) ? b : a; }
  __device__ void add(State& s, int64_t offset, const Channel&) const {
    using std::fabs;
    s.m = max_nan(s.m, fabs(static_cast<acc_t>(x[offset])));
  }
  __device__ static State merge(const State& a, const State& b) { return {max_nan(a.m, b.m)}; }
};

// R: a residual is read (at y's offsets) and removed before the affine inversion.
template <Activation A, bool R, typename scalar_t, typename acc_t>
struct BackwardReduceOp {
  const scalar_t* y;
  const scalar_t* dy;
  const scalar_t* r;    // residual (R only)
  const acc_t* weight;  // nullable
  const acc_t* bias;    // nullable
  acc_t eps;
  ActivationParams<acc_t> p;
  struct State {
    acc_t s_dz, s_dz_xhat;
  };
  using Channel = AffineParams<acc_t>;
  __device__ Channel channel(int64_t c) const { return affine_params<acc_t>(weight, bias, c, eps); }
  __device__ static State identity() { return {acc_t(0), acc_t(0)}; }
  __device__ void add(State& s, int64_t offset, const Channel& a) const {
    backward_reduce_element<A, acc_t>(
        static_cast<acc_t>(y[offset]), static_cast<acc_t>(dy[offset]), residual_at<R, acc_t>(r, offset), a, p, s.s_dz,
        s.s_dz_xhat);
  }
  __device__ static State merge(const State& a, const State& b) { return {a.s_dz + b.s_dz, a.s_dz_xhat + b.s_dz_xhat}; }
};

// Each block reduces its threads over threadIdx.y (blockDim.y a power of two) and writes, for each
// channel of its tile, one partial at partial[c * gridDim.y + blockIdx.y].
template <typename Op>
__device__ void block_reduce_store(typename Op::State s, typename Op::State* partial, int64_t c, int64_t C) {
  using State = typename Op::State;
  __shared__ State buf[kReduceThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  buf[tid] = s;
  __syncthreads();
  for (int stride = blockDim.y / 2; stride > 0; stride /= 2) {
    if (threadIdx.y < stride) {
      buf[tid] = Op::merge(buf[tid], buf[tid + stride * blockDim.x]);
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) {
    partial[c * gridDim.y + blockIdx.y] = buf[threadIdx.x];
  }
}

// NCS: block (1, 256) per channel c = blockIdx.x; work units are chunks of kChunk elements of a row.
template <typename Op>
__global__ void reduce_ncs_kernel(Op op, int64_t N, int64_t C, int64_t S, typename Op::State* partial) {
  const int64_t c = blockIdx.x;
  const auto ch = op.channel(c);
  auto s = Op::identity();
  const int64_t chunks_per_row = (S + kChunk - 1) / kChunk;
  for (int64_t u = blockIdx.y; u < N * chunks_per_row; u += gridDim.y) {
    const int64_t n = u / chunks_per_row;
    const int64_t begin = (u - n * chunks_per_row) * kChunk;
    const int64_t end = begin + kChunk < S ? begin + kChunk : S;
    const int64_t row = (n * C + c) * S;
    for (int64_t i = begin + threadIdx.y; i < end; i += blockDim.y) {
      op.add(s, row + i, ch);
    }
  }
  block_reduce_store<Op>(s, partial, c, C);
}

// NSC: block (32, 8); threadIdx.x picks the channel inside a tile of 32, threadIdx.y the pixel row.
template <typename Op>
__global__ void reduce_nsc_kernel(Op op, int64_t rows, int64_t C, typename Op::State* partial) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  auto s = Op::identity();
  if (c < C) {
    const auto ch = op.channel(c);
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
         r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
      op.add(s, r * C + c, ch);
    }
  }
  block_reduce_store<Op>(s, partial, c, C);
}

// Merges the G partials of each channel (one thread per channel) and lets `finish` write the result.
template <typename Op, typename Finish>
__global__ void merge_partials_kernel(const typename Op::State* partial, int64_t C, int64_t G, Finish finish) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    auto s = Op::identity();
    for (int64_t g = 0; g < G; ++g) {
      s = Op::merge(s, partial[c * G + g]);
    }
    finish(c, s);
  }
}

template <typename acc_t>
struct FinishStatistics {
  acc_t* mean;
  acc_t* var;
  template <typename State>
  __device__ void operator()(int64_t c, const State& s) const {
    mean[c] = s.mean;
    var[c] = s.m2 / static_cast<acc_t>(s.n);
  }
};

template <typename acc_t>
struct FinishAbsmax {
  acc_t* out;
  template <typename State>
  __device__ void operator()(int64_t c, const State& s) const {
    out[c] = s.m;
  }
};

template <typename acc_t>
struct FinishSums {
  acc_t* sum_dz;
  acc_t* sum_dz_xhat;
  template <typename State>
  __device__ void operator()(int64_t c, const State& s) const {
    sum_dz[c] = s.s_dz;
    sum_dz_xhat[c] = s.s_dz_xhat;
  }
};

// Launches the two-stage reduction of `op` over x's geometry; `finish` writes the per-channel result.
template <typename Op, typename Finish>
void launch_channel_reduce(const Op& op, const Shape& sh, const at::Tensor& like, Finish finish) {
  using State = typename Op::State;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t target_blocks = 4 * static_cast<int64_t>(multiprocessors(like));
  dim3 block, grid;
  int64_t max_g;
  if (sh.nsc) {
    block = dim3(kTileChannels, kTileRows);
    const int64_t tiles = (sh.C + kTileChannels - 1) / kTileChannels;
    grid.x = static_cast<unsigned>(tiles);
    max_g = (sh.N * sh.S + kTileRows - 1) / kTileRows;
  } else {
    block = dim3(1, kReduceThreads);
    grid.x = static_cast<unsigned>(sh.C);
    max_g = sh.N * ((sh.S + kChunk - 1) / kChunk);
  }
  const int64_t g = std::clamp<int64_t>((target_blocks + grid.x - 1) / grid.x, 1, std::min<int64_t>(max_g, 1024));
  grid.y = static_cast<unsigned>(g);
  auto partial = at::empty({static_cast<int64_t>(sizeof(State)) * sh.C * g}, like.options().dtype(at::kByte));
  auto* partial_ptr = reinterpret_cast<State*>(partial.mutable_data_ptr());
  if (sh.nsc) {
    reduce_nsc_kernel<Op><<<grid, block, 0, stream>>>(op, sh.N * sh.S, sh.C, partial_ptr);
  } else {
    reduce_ncs_kernel<Op><<<grid, block, 0, stream>>>(op, sh.N, sh.C, sh.S, partial_ptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int threads = 128;
  const int64_t blocks = std::min<int64_t>((sh.C + threads - 1) / threads, 65535);
  merge_partials_kernel<Op, Finish>
      <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(partial_ptr, sh.C, g, finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------------
// Elementwise passes: a block per row; f(offset, channel) handles one element.

template <typename F>
__global__ void rows_kernel(F f, int64_t rows, int64_t row_len, int64_t C, bool nsc) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t base = r * row_len;
    const int64_t row_channel = nsc ? 0 : r % C;
    for (int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; j < row_len;
         j += static_cast<int64_t>(gridDim.y) * blockDim.x) {
      f(base + j, nsc ? j : row_channel);
    }
  }
}

template <typename F>
void launch_rows(const F& f, const Shape& sh) {
  const int64_t rows = sh.nsc ? sh.N * sh.S : sh.N * sh.C;
  const int64_t row_len = sh.nsc ? sh.C : sh.S;
  const dim3 grid(
      static_cast<unsigned>(std::min<int64_t>(rows, 1 << 20)),
      static_cast<unsigned>(std::clamp<int64_t>((row_len + kRowThreads - 1) / kRowThreads, 1, 65535)));
  rows_kernel<F><<<grid, kRowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(f, rows, row_len, sh.C, sh.nsc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Activation A, bool R, typename scalar_t, typename acc_t>
struct ForwardFn {
  scalar_t* x;
  const scalar_t* r;  // residual (R only)
  const acc_t* mean;
  const acc_t* var;
  const acc_t* weight;
  const acc_t* bias;
  acc_t eps;
  ActivationParams<acc_t> p;
  __device__ void operator()(int64_t i, int64_t c) const {
    const auto a = affine_params<acc_t>(weight, bias, c, eps);
    const acc_t scale = a.gamma * rsqrt_acc(var[c] + eps);
    x[i] = static_cast<scalar_t>(forward_element<A, acc_t>(
        static_cast<acc_t>(x[i]), scale, a.beta - mean[c] * scale, residual_at<R, acc_t>(r, i), p));
  }
};

// dx; `means_*` are per-channel means (scale 1) or sums (scale 1 / count); null in eval mode.
// R: a residual is read, and its gradient dz written in the same pass.
template <Activation A, bool R, typename scalar_t, typename acc_t>
struct BackwardFn {
  const scalar_t* y;
  const scalar_t* dy;
  const scalar_t* r;  // residual (R only)
  scalar_t* dx;
  scalar_t* dr;  // dL/dresidual = dz (R only)
  const acc_t* var;
  const acc_t* weight;
  const acc_t* bias;
  const acc_t* m_dz;
  const acc_t* m_dz_xhat;
  acc_t m_scale;
  acc_t eps;
  ActivationParams<acc_t> p;
  __device__ void operator()(int64_t i, int64_t c) const {
    const auto a = affine_params<acc_t>(weight, bias, c, eps);
    const acc_t gamma_rstd = a.gamma * rsqrt_acc(var[c] + eps);
    const acc_t md = m_dz != nullptr ? m_dz[c] * m_scale : acc_t(0);
    const acc_t mdx = m_dz_xhat != nullptr ? m_dz_xhat[c] * m_scale : acc_t(0);
    acc_t dz;
    dx[i] = static_cast<scalar_t>(backward_element<A, acc_t>(
        static_cast<acc_t>(y[i]), static_cast<acc_t>(dy[i]), residual_at<R, acc_t>(r, i), a, p, gamma_rstd, md, mdx,
        dz));
    if constexpr (R) dr[i] = static_cast<scalar_t>(dz);
  }
};

template <Activation A, bool R, typename scalar_t, typename acc_t>
struct InvertFn {
  const scalar_t* y;
  const scalar_t* r;  // residual (R only)
  scalar_t* out;
  const acc_t* weight;
  const acc_t* bias;
  acc_t eps;
  ActivationParams<acc_t> p;
  __device__ void operator()(int64_t i, int64_t c) const {
    out[i] = static_cast<scalar_t>(invert_element<A, acc_t>(
        static_cast<acc_t>(y[i]), residual_at<R, acc_t>(r, i), affine_params<acc_t>(weight, bias, c, eps), p));
  }
};

// ------------------------------------------------------------------------------------------------
// Host functions.

std::tuple<at::Tensor, at::Tensor> statistics_cuda(const at::Tensor& x_in) {
  check_input(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = to_native(x_in);
  const int64_t C = x.size(1);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  auto mean = at::empty({C}, x.options().dtype(acc_type));
  auto var = at::empty({C}, x.options().dtype(acc_type));
  if (x.numel() == 0) {
    mean.fill_(NAN);
    var.fill_(NAN);
    return {mean, var};
  }
  const Shape sh = shape_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_statistics_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StatisticsOp<scalar_t, acc_t> op{x.const_data_ptr<scalar_t>()};
    launch_channel_reduce(
        op, sh, x, FinishStatistics<acc_t>{mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>()});
  });
  return {mean, var};
}

at::Tensor absmax_cuda(const at::Tensor& x_in) {
  check_input(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = to_native(x_in);
  const int64_t C = x.size(1);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  if (x.numel() == 0) return at::zeros({C}, x.options().dtype(acc_type));
  auto out = at::empty({C}, x.options().dtype(acc_type));
  const Shape sh = shape_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_absmax_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AbsmaxOp<scalar_t, acc_t> op{x.const_data_ptr<scalar_t>()};
    launch_channel_reduce(op, sh, x, FinishAbsmax<acc_t>{out.mutable_data_ptr<acc_t>()});
  });
  return out;
}

void forward_cuda(
    at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view activation, double activation_param,
    const std::optional<at::Tensor>& residual) {
  const Activation act = check_forward_args(x, mean, var, weight, bias, eps, activation, activation_param);
  const bool has_r = check_residual(residual, x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return;
  // A layout the kernels cannot walk is computed in a contiguous copy and written back; the residual is
  // read in the layout of the tensor the kernel writes.
  at::Tensor work = to_native(x);
  const at::Tensor r = residual_like(residual, has_r, work);
  const Shape sh = shape_of(work);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto m = as_acc<acc_t>(mean), v = as_acc<acc_t>(var);
    const auto w = optional_acc<acc_t>(weight), b = optional_acc<acc_t>(bias);
    dispatch_activation(act, [&](auto A) {
      dispatch_residual(has_r, [&](auto R) {
        const ForwardFn<decltype(A)::value, decltype(R)::value, scalar_t, acc_t> f{
            work.mutable_data_ptr<scalar_t>(),
            residual_ptr<scalar_t>(r),
            m.const_data_ptr<acc_t>(),
            v.const_data_ptr<acc_t>(),
            optional_ptr<acc_t>(w),
            optional_ptr<acc_t>(b),
            static_cast<acc_t>(eps),
            activation_params<acc_t>(act, activation_param)};
        launch_rows(f, sh);
      });
    });
  });
  if (!work.is_same(x)) {
    x.copy_(work);
  }
}

// Per-channel sums of dz and dz * x_hat over native-layout (y, dy); `r` is the residual in y's layout,
// or undefined.
std::tuple<at::Tensor, at::Tensor> reduce_sums(
    const at::Tensor& y, const at::Tensor& dy, const at::Tensor& r, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, Activation act, double activation_param) {
  const int64_t C = y.size(1);
  const auto acc_type = at::toOpMathType(y.scalar_type());
  auto sum_dz = at::zeros({C}, y.options().dtype(acc_type));
  auto sum_dz_xhat = at::zeros({C}, y.options().dtype(acc_type));
  if (y.numel() == 0) return {sum_dz, sum_dz_xhat};
  const Shape sh = shape_of(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "inplace_abn_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = optional_acc<acc_t>(weight), b = optional_acc<acc_t>(bias);
    dispatch_activation(act, [&](auto A) {
      dispatch_residual(r.defined(), [&](auto R) {
        const BackwardReduceOp<decltype(A)::value, decltype(R)::value, scalar_t, acc_t> op{
            y.const_data_ptr<scalar_t>(),
            dy.const_data_ptr<scalar_t>(),
            residual_ptr<scalar_t>(r),
            optional_ptr<acc_t>(w),
            optional_ptr<acc_t>(b),
            static_cast<acc_t>(eps),
            activation_params<acc_t>(act, activation_param)};
        launch_channel_reduce(
            op, sh, y, FinishSums<acc_t>{sum_dz.mutable_data_ptr<acc_t>(), sum_dz_xhat.mutable_data_ptr<acc_t>()});
      });
    });
  });
  return {sum_dz, sum_dz_xhat};
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cuda(
    const at::Tensor& y_in, const at::Tensor& dy_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view activation, double activation_param,
    const std::optional<at::Tensor>& residual) {
  const Activation act = check_backward_reduce_args(y_in, dy_in, weight, bias, eps, activation, activation_param);
  const bool has_r = check_residual(residual, y_in, "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const auto y = to_native(y_in);
  const auto dy = to_native(dy_in, native_layout(y));
  return reduce_sums(y, dy, residual_like(residual, has_r, y), weight, bias, eps, act, activation_param);
}

// (dx, grad_residual) from native-layout (y, dy), the means given directly (scale 1) or as sums (scale
// 1 / count); undefined = eval mode. With a residual `r` (y's layout), grad_residual = dz is written in the
// dx pass, with y_in's strides like dx (else it is the empty (0,) tensor of the schema).
std::tuple<at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& y_in, const at::Tensor& y, const at::Tensor& dy, const at::Tensor& r, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& m_dz,
    const at::Tensor& m_dz_xhat, double m_scale, double eps, Activation act, double activation_param) {
  const bool has_r = r.defined();
  if (y.numel() == 0) return {at::empty_like(y_in), has_r ? at::empty_like(y_in) : no_grad_residual(y_in)};
  Output dx = make_output(y_in, y);
  const at::Tensor& out = dx.work;
  const at::Tensor none = no_grad_residual(y_in);
  Output dr = has_r ? make_output(y_in, y) : Output{none, none};
  const Shape sh = shape_of(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "inplace_abn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = as_acc<acc_t>(var);
    const auto w = optional_acc<acc_t>(weight), b = optional_acc<acc_t>(bias);
    const auto m1 = m_dz.defined() ? as_acc<acc_t>(m_dz) : at::Tensor();
    const auto m2 = m_dz_xhat.defined() ? as_acc<acc_t>(m_dz_xhat) : at::Tensor();
    scalar_t* drp = has_r ? dr.work.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_activation(act, [&](auto A) {
      dispatch_residual(has_r, [&](auto R) {
        // decay_t: inside this lambda the enclosing lambda's parameter is seen as a captured reference.
        const BackwardFn<std::decay_t<decltype(A)>::value, decltype(R)::value, scalar_t, acc_t> f{
            y.const_data_ptr<scalar_t>(),
            dy.const_data_ptr<scalar_t>(),
            residual_ptr<scalar_t>(r),
            out.mutable_data_ptr<scalar_t>(),
            drp,
            v.const_data_ptr<acc_t>(),
            optional_ptr<acc_t>(w),
            optional_ptr<acc_t>(b),
            optional_ptr<acc_t>(m1),
            optional_ptr<acc_t>(m2),
            static_cast<acc_t>(m_scale),
            static_cast<acc_t>(eps),
            activation_params<acc_t>(act, activation_param)};
        launch_rows(f, sh);
      });
    });
  });
  dx.finish();
  dr.finish();
  return {dx.result, dr.result};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& y_in, const at::Tensor& dy_in, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean_dz,
    const std::optional<at::Tensor>& mean_dz_xhat, double eps, c10::string_view activation, double activation_param,
    const std::optional<at::Tensor>& residual) {
  const auto [act, has_dz] =
      check_backward_args(y_in, dy_in, var, weight, bias, mean_dz, mean_dz_xhat, eps, activation, activation_param);
  const bool has_r = check_residual(residual, y_in, "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const auto y = to_native(y_in);
  const auto dy = to_native(dy_in, native_layout(y));
  return backward_impl(
      y_in, y, dy, residual_like(residual, has_r, y), var, weight, bias, has_dz ? *mean_dz : at::Tensor(),
      has_dz ? *mean_dz_xhat : at::Tensor(), 1.0, eps, act, activation_param);
}

at::Tensor invert_cuda(
    const at::Tensor& y_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    c10::string_view activation, double activation_param, const std::optional<at::Tensor>& residual) {
  const Activation act = check_invert_args(y_in, weight, bias, eps, activation, activation_param);
  const bool has_r = check_residual(residual, y_in, "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  if (y_in.numel() == 0) return at::empty_like(y_in);
  const auto y = to_native(y_in);
  const auto r = residual_like(residual, has_r, y);
  Output xhat = make_output(y_in, y);
  const at::Tensor& out = xhat.work;
  const Shape sh = shape_of(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "inplace_abn_invert_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = optional_acc<acc_t>(weight), b = optional_acc<acc_t>(bias);
    dispatch_activation(act, [&](auto A) {
      dispatch_residual(has_r, [&](auto R) {
        const InvertFn<decltype(A)::value, decltype(R)::value, scalar_t, acc_t> f{
            y.const_data_ptr<scalar_t>(),
            residual_ptr<scalar_t>(r),
            out.mutable_data_ptr<scalar_t>(),
            optional_ptr<acc_t>(w),
            optional_ptr<acc_t>(b),
            static_cast<acc_t>(eps),
            activation_params<acc_t>(act, activation_param)};
        launch_rows(f, sh);
      });
    });
  });
  xhat.finish();
  return xhat.result;
}

// ------------------------------------------------------------------------------------------------
// Per-channel epilogues of the *_train ops: C values, one thread each, arithmetic from activation.h.

constexpr int kChannelThreads = 128;

unsigned channel_blocks(int64_t C) {
  return static_cast<unsigned>(std::clamp<int64_t>((C + kChannelThreads - 1) / kChannelThreads, 1, 65535));
}

// The update runs in the wider of the buffer's dtype and the statistics' opmath dtype: float64 buffers of a
// float32 layer are updated in float64 (as the CPU kernel and the pure-PyTorch backend do), not rounded to
// float32 every step.
template <typename r_t, typename acc_t>
__global__ void running_update_kernel(
    r_t* running, int64_t stride, const acc_t* batch, double factor, double momentum, int64_t C) {
  using u_t = std::conditional_t<std::is_same_v<r_t, double>, double, acc_t>;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    running[c * stride] = static_cast<r_t>(running_update<u_t>(
        static_cast<u_t>(running[c * stride]), static_cast<u_t>(batch[c]) * static_cast<u_t>(factor),
        static_cast<u_t>(momentum)));
  }
}

template <typename acc_t>
__global__ void weight_grad_kernel(acc_t* sum_dz_xhat, const acc_t* weight, int64_t C) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    sum_dz_xhat[c] = weight_grad<acc_t>(sum_dz_xhat[c], weight[c]);
  }
}

template <typename acc_t>
void update_running(at::Tensor& running, const at::Tensor& batch, double factor, double momentum) {
  const int64_t C = running.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "inplace_abn_running_cuda", [&] {
    running_update_kernel<scalar_t, acc_t>
        <<<channel_blocks(C), kChannelThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            running.mutable_data_ptr<scalar_t>(), running.stride(0), batch.const_data_ptr<acc_t>(), factor, momentum,
            C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> forward_train_cuda(
    at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps, c10::string_view activation, double activation_param, const std::optional<at::Tensor>& residual) {
  const bool update = check_running_stats(running_mean, running_var, momentum, x);
  check_residual(residual, x, "x");  // before the statistics: a bad residual must not cost a launch
  auto [mean, var] = statistics_cuda(x);
  forward_cuda(x, mean, var, weight, bias, eps, activation, activation_param, residual);
  if (update) {
    const c10::cuda::CUDAGuard guard(x.device());
    const double count = static_cast<double>(x.numel() / x.size(1));
    at::Tensor rm = *running_mean, rv = *running_var;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inplace_abn_forward_train_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      update_running<acc_t>(rm, mean, 1.0, momentum);
      update_running<acc_t>(rv, var, count / (count - 1.0), momentum);
    });
  }
  return {mean, var};
}

// The means are read as sums * (1 / count) inside the dx kernel: no extra launches, no host sync.
// The residual is brought into y's layout once and read by both passes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_train_cuda(
    const at::Tensor& y_in, const at::Tensor& dy_in, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view activation, double activation_param,
    const std::optional<at::Tensor>& residual) {
  const Activation act =
      check_backward_args(y_in, dy_in, var, weight, bias, std::nullopt, std::nullopt, eps, activation, activation_param)
          .first;
  const bool has_r = check_residual(residual, y_in, "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const auto y = to_native(y_in);
  const auto dy = to_native(dy_in, native_layout(y));
  const auto r = residual_like(residual, has_r, y);
  auto [sum_dz, sum_dz_xhat] = reduce_sums(y, dy, r, weight, bias, eps, act, activation_param);
  const int64_t C = y.size(1);
  const double count = static_cast<double>(y.numel() / std::max<int64_t>(1, C));
  auto [dx, grad_residual] = backward_impl(
      y_in, y, dy, r, var, weight, bias, sum_dz, sum_dz_xhat, count > 0 ? 1.0 / count : 0.0, eps, act,
      activation_param);
  // Only after the dx kernel (same stream), which reads sum_dz_xhat unsigned: the sign goes in place.
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  if (has_w && C > 0) {
    AT_DISPATCH_FLOATING_TYPES(sum_dz_xhat.scalar_type(), "inplace_abn_weight_grad_cuda", [&] {
      const at::Tensor w = as_acc<scalar_t>(*weight);
      weight_grad_kernel<scalar_t><<<channel_blocks(C), kChannelThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          sum_dz_xhat.mutable_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto grad_weight = has_w ? sum_dz_xhat.to(weight->scalar_type()) : sum_dz_xhat;
  auto grad_bias = has_b ? sum_dz.to(bias->scalar_type()) : sum_dz;
  return std::make_tuple(dx, grad_weight, grad_bias, grad_residual);
}

}  // namespace

// Registers the CUDA implementations of the schemas declared in src/ops.cpp.
TORCH_LIBRARY_IMPL(inplace_abn, CUDA, m) {
  m.impl("statistics", &statistics_cuda);
  m.impl("absmax", &absmax_cuda);
  m.impl("forward_", &forward_cuda);
  m.impl("backward_reduce", &backward_reduce_cuda);
  m.impl("backward", &backward_cuda);
  m.impl("invert", &invert_cuda);
  m.impl("forward_train_", &forward_train_cuda);
  m.impl("backward_train", &backward_train_cuda);
}

}  // namespace inplace_abn
