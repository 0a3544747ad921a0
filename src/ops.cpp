// The contract of every inplace_abn custom op, in one place. Each backend (src/cpu/, src/cuda/)
// registers its own kernels for these schemas with TORCH_LIBRARY_IMPL.
//
// Op set (C = channels; "opmath" = float64 for float64 inputs, float32 otherwise):
//   statistics(x)                  -> per-channel mean and biased variance, opmath dtype.
//   absmax(x)                      -> per-channel max |x|, opmath dtype (the residual fusion's accuracy
//                                     rule, docs/math.md "Residual fusion").
//   forward_(x, mean, var, ...)    -> writes y = act(gamma * (x - mean) * rstd + beta) over x.
//   backward_reduce(y, dy, ...)    -> per-channel sums of dz and dz * x_hat (docs/math.md steps 1-3),
//                                     recovered from the OUTPUT y, opmath dtype.
//   backward(y, dy, var, ...)      -> dx (docs/math.md step 4), grad_residual; mean_dz/mean_dz_xhat
//                                     absent = eval mode.
//   invert(y, ...)                 -> x_hat recovered from y (diagnostics: inversion accuracy).
//   forward_train_(x, ..., running_mean, running_var, momentum, ...)
//                                  -> statistics + forward_ in one call (local statistics), and the
//                                     running statistics updated as nn.BatchNorm does (when given).
//   backward_train(y, dy, var, ...)-> backward_reduce + training backward on local statistics:
//                                     (dx, grad_weight = sign(w) * sum_dz_xhat, grad_bias = sum_dz,
//                                     grad_residual),
//                                     gradients in the parameters' dtypes.
// The *_train ops exist for the common single-process case: every small ATen op they absorb (the
// running-statistics update, the means, the weight-gradient sign) costs microseconds of dispatch on
// small layers. The split ops serve the synchronised layer, which all-reduces between them. Each
// schema declares exactly what it writes: forward_ its first argument, forward_train_ its first
// argument and the optional running statistics.
//
// Residual fusion: every op but statistics takes an optional `residual` r of x's shape, added after the
// affine map (z = gamma * x_hat + beta + r, y = act(z)); the backward ops subtract it again when they
// invert y. backward and backward_train return dL/dr = dz as `grad_residual`, written in the dx pass
// (an empty (0,) tensor without a residual): an output, not a mutated argument, so that the ops stay
// functional in compiled backward graphs. Without a residual every op computes what it did before.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import inplace_abn._C` only needs to load this shared object so that the static TORCH_LIBRARY
// registrations run; a bare module (no pybind) keeps it independent of libtorch_python.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                            // m_name
      "inplace_abn custom ops (registered in torch.ops.inplace_abn)",  // m_doc
      -1,                                                              // m_size
      nullptr,                                                         // m_methods
      nullptr,                                                         // m_slots
      nullptr,                                                         // m_traverse
      nullptr,                                                         // m_clear
      nullptr,                                                         // m_free
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(inplace_abn, m) {
  m.def("statistics(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("absmax(Tensor x) -> Tensor");
  m.def(
      "forward_(Tensor(a!) x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
      "str activation, float activation_param, Tensor? residual=None) -> ()");
  m.def(
      "backward_reduce(Tensor y, Tensor dy, Tensor? weight, Tensor? bias, float eps, str activation, "
      "float activation_param, Tensor? residual=None) -> (Tensor sum_dz, Tensor sum_dz_xhat)");
  m.def(
      "backward(Tensor y, Tensor dy, Tensor var, Tensor? weight, Tensor? bias, Tensor? mean_dz, "
      "Tensor? mean_dz_xhat, float eps, str activation, float activation_param, Tensor? residual=None) "
      "-> (Tensor dx, Tensor grad_residual)");
  m.def(
      "invert(Tensor y, Tensor? weight, Tensor? bias, float eps, str activation, float activation_param, "
      "Tensor? residual=None) -> Tensor");
  m.def(
      "forward_train_(Tensor(a!) x, Tensor? weight, Tensor? bias, Tensor(b!)? running_mean, "
      "Tensor(c!)? running_var, float momentum, float eps, str activation, float activation_param, "
      "Tensor? residual=None) -> (Tensor mean, Tensor var)");
  m.def(
      "backward_train(Tensor y, Tensor dy, Tensor var, Tensor? weight, Tensor? bias, float eps, str activation, "
      "float activation_param, Tensor? residual=None) "
      "-> (Tensor dx, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
}
