// The per-element math of In-Place Activated BatchNorm, shared by every backend.
//
// This header is included by the CPU kernels (src/cpu/) and by the CUDA kernels (src/cuda/). It is the
// only place where the activation, its inverse and the affine inversion are written down, so the CPU
// test-suite (which runs everywhere) exercises exactly the arithmetic the GPU executes.
//
// Only invertible activations qualify: the backward pass recovers the pre-activation z from the stored
// output y, then x_hat = (z - beta) / gamma. leaky_relu with slope 0 (ReLU) maps every negative z to 0
// and is handled outside the fused kernels (the Python layer keeps z itself for such layers).
//
// Notation (per channel): gamma = |weight| + eps (1 without affine), beta = bias (0 without affine),
// z = gamma * x_hat + beta, y = act(z). See docs/math.md / Rota Bulo et al., CVPR 2018, Sec. 3.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace inplace_abn {

// Values are part of no schema (the schema carries the activation as a string); they only select a
// template instantiation.
enum class Activation : int64_t { Identity = 0, LeakyReLU = 1, ELU = 2 };

// Per-call activation constants, precomputed once so the inner loops multiply instead of divide.
// NB: passed BY VALUE everywhere: a reference could alias the output array, which stops the compiler
// from hoisting the loads and vectorising the CPU loops.
template <typename T>
struct ActivationParams {
  T param;      // leaky_relu: negative slope; elu: alpha; identity: unused
  T inv_param;  // 1 / param (0 for identity)
};

template <Activation A>
struct ActivationOp;

template <>
struct ActivationOp<Activation::Identity> {
  template <typename T>
  static C10_HOST_DEVICE inline T forward(T z, ActivationParams<T>) {
    return z;
  }
  // Recovers z and dL/dz from y and dL/dy.
  template <typename T>
  static C10_HOST_DEVICE inline void invert(T y, T dy, ActivationParams<T>, T& z, T& dz) {
    z = y;
    dz = dy;
  }
};

template <>
struct ActivationOp<Activation::LeakyReLU> {
  template <typename T>
  static C10_HOST_DEVICE inline T forward(T z, ActivationParams<T> p) {
    const T neg = z * p.param;  // both sides computed: branch-free, so the loops vectorise
    return z >= T(0) ? z : neg;
  }
  // NB: with slope > 0, sign(y) == sign(z), so the branch can be taken on y. At y == 0 (z == 0) the slope
  // side is taken, which is PyTorch's convention for the derivative of leaky_relu at 0.
  template <typename T>
  static C10_HOST_DEVICE inline void invert(T y, T dy, ActivationParams<T> p, T& z, T& dz) {
    const bool pos = y > T(0);
    const T z_neg = y * p.inv_param;
    const T dz_neg = dy * p.param;
    z = pos ? y : z_neg;
    dz = pos ? dy : dz_neg;
  }
};

template <>
struct ActivationOp<Activation::ELU> {
  template <typename T>
  static C10_HOST_DEVICE inline T forward(T z, ActivationParams<T> p) {
    using std::expm1;
    return z >= T(0) ? z : p.param * expm1(z);
  }
  // y = alpha * (exp(z) - 1)  =>  z = log1p(y / alpha),  dy/dz = exp(z) * alpha = y + alpha.
  // At y == 0 the negative side is taken (derivative alpha), as PyTorch's elu_backward does.
  // NB: an output saturated at -alpha (z below ~-17 in float32) would give log1p(-1) = -inf and then
  // dz * x_hat = 0 * inf = NaN. Clamping y / alpha just above -1 keeps z finite; dz is then exactly 0
  // for those elements, so the reductions are unaffected and only the (unrecoverable) x_hat of a
  // saturated element is approximated by the largest z that saturates.
  template <typename T>
  static C10_HOST_DEVICE inline void invert(T y, T dy, ActivationParams<T> p, T& z, T& dz) {
    using std::log1p;
    const bool pos = y > T(0);
    const T lowest = T(-1) + elu_clamp_margin<T>();
    // "below the floor -> floor", not "above -> keep": a NaN y fails the comparison and stays NaN.
    const T ratio = y * p.inv_param < lowest ? lowest : y * p.inv_param;
    // Unlike leaky_relu, a branch: log1p does not vectorise anyway, and this way it only runs for y <= 0.
    z = pos ? y : log1p(ratio);
    dz = pos ? dy : dy * (y + p.param);
  }

 private:
  template <typename T>
  static C10_HOST_DEVICE inline T elu_clamp_margin() {
    // Half an ulp of 1 in T: the smallest margin for which -1 + margin is representable.
    return sizeof(T) >= 8 ? T(1.1102230246251565e-16) : T(5.9604644775390625e-08);
  }
};

// Per-channel affine constants of the inversion z -> x_hat.
template <typename T>
struct AffineParams {
  T gamma;      // |weight| + eps, or 1
  T inv_gamma;  // 1 / gamma
  T beta;       // bias, or 0
};

// gamma = |w| + eps keeps the affine map invertible even for w == 0.
template <typename T>
C10_HOST_DEVICE inline AffineParams<T> affine_params(const T* weight, const T* bias, int64_t c, T eps) {
  using std::fabs;
  const T gamma = weight != nullptr ? fabs(weight[c]) + eps : T(1);
  return {gamma, T(1) / gamma, bias != nullptr ? bias[c] : T(0)};
}

// x_hat = (z - beta) / gamma. Kept as a subtraction first: with gamma ~ eps the difference z - beta is
// the only accurate quantity, and expanding it (z / gamma - beta / gamma) would cancel catastrophically.
template <typename T>
C10_HOST_DEVICE inline T affine_invert(T z, AffineParams<T> a) {
  return (z - a.beta) * a.inv_gamma;
}

// Residual fusion (docs/math.md, "Residual fusion"): every element function takes the residual r added
// after the affine map, z = gamma * x_hat + beta + r; layers without a residual pass r = 0, which leaves
// their arithmetic bit for bit unchanged (z - 0 == z).

// Forward transform of one element: y = act(scale * x + shift + r), where the caller folded
// scale = gamma * rstd and shift = beta - mean * scale.
template <Activation A, typename T>
C10_HOST_DEVICE inline T forward_element(T x, T scale, T shift, T r, ActivationParams<T> p) {
  return ActivationOp<A>::forward(x * scale + shift + r, p);
}

// x_hat from the recovered pre-activation: the residual is removed first, while z - r is still exact
// (Sterbenz) when the residual dominates z.
template <typename T>
C10_HOST_DEVICE inline T residual_invert(T z, T r, AffineParams<T> a) {
  return affine_invert(z - r, a);
}

// Backward accumulation of one element: adds dz to s_dz and dz * x_hat to s_dz_xhat (docs/math.md step 3).
template <Activation A, typename T>
C10_HOST_DEVICE inline void backward_reduce_element(
    T y, T dy, T r, AffineParams<T> a, ActivationParams<T> p, T& s_dz, T& s_dz_xhat) {
  T z, dz;
  ActivationOp<A>::invert(y, dy, p, z, dz);
  s_dz += dz;
  s_dz_xhat += dz * residual_invert(z, r, a);
}

// dx of one element: gamma * rstd * (dz - mean(dz) - x_hat * mean(dz * x_hat)) in training (docs/math.md
// step 4); the caller passes mean_dz = mean_dz_xhat = 0 in eval mode, where the statistics are constants.
// dz is also handed back: it is the residual's gradient.
template <Activation A, typename T>
C10_HOST_DEVICE inline T backward_element(
    T y, T dy, T r, AffineParams<T> a, ActivationParams<T> p, T gamma_rstd, T mean_dz, T mean_dz_xhat, T& dz) {
  T z;
  ActivationOp<A>::invert(y, dy, p, z, dz);
  return gamma_rstd * (dz - mean_dz - residual_invert(z, r, a) * mean_dz_xhat);
}

// x_hat of one element (diagnostics: the accuracy of the inversion).
template <Activation A, typename T>
C10_HOST_DEVICE inline T invert_element(T y, T r, AffineParams<T> a, ActivationParams<T> p) {
  T z, dz;
  ActivationOp<A>::invert(y, T(0), p, z, dz);
  return residual_invert(z, r, a);
}

// ------------------------------------------------------------------------------------------------
// Per-channel epilogues (C values per call, not elements), kept here for the same reason: every
// backend must update running statistics and form the weight gradient with the same arithmetic.

// nn.BatchNorm's running update, running + momentum * (batch - running); the caller passes the
// unbiased batch variance (biased var * count / (count - 1)) for running_var.
template <typename T>
C10_HOST_DEVICE inline T running_update(T running, T batch, T momentum) {
  return running + momentum * (batch - running);
}

// dL/dweight = sign(weight) * sum(dz * x_hat), since gamma = |weight| + eps; sign(0) = +1 so that a
// zero weight (e.g. a zero-initialised last layer of a residual block) still learns.
template <typename T>
C10_HOST_DEVICE inline T weight_grad(T sum_dz_xhat, T weight) {
  return weight < T(0) ? -sum_dz_xhat : sum_dz_xhat;
}

}  // namespace inplace_abn
