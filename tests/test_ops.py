"""Op contract of torch.ops.inplace_abn: torch.library.opcheck on every op (schema, fake kernel, AOT dispatch).

opcheck checks that each schema tells the truth (only forward_ mutates, only its first argument; no
output aliases an input), that the fake kernels reproduce shapes, dtypes and strides, and that the ops
survive functionalisation under dynamic shapes. Numerics are covered by the other test files.
"""

from __future__ import annotations

import pytest
import torch
from helpers import OPS, op_samples, random_input

import inplace_abn
from inplace_abn import pure_backend

pytestmark = pytest.mark.skipif(not inplace_abn.extension_loaded(), reason="compiled extension not built")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, dtype):
    """Every op passes all of torch.library.opcheck's checks on every sample."""
    overload = getattr(torch.ops.inplace_abn, op).default
    samples = list(op_samples(op, dtype))
    assert samples, "no samples generated"
    for args in samples:
        # the mutating ops write into x: give every opcheck run a private copy (keeping its strides)
        if op.endswith("_"):
            args = tuple(
                a.clone(memory_format=torch.preserve_format) if isinstance(a, torch.Tensor) else a for a in args
            )
        result = torch.library.opcheck(overload, args)
        failed = {k: v for k, v in result.items() if v != "SUCCESS"}
        assert not failed, (
            f"{op} {dtype} {[tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]}: {failed}"
        )


def test_every_op_has_a_cpu_kernel_and_fake_kernel():
    """The schemas of src/ops.cpp all have CPU kernels and fake kernels (or are mutating with no output)."""
    for op in OPS:
        name, overload = f"inplace_abn::{op}", getattr(torch.ops.inplace_abn, op).default
        assert overload.has_kernel_for_dispatch_key("CPU"), f"{name} has no CPU kernel"
        assert overload.has_kernel_for_dispatch_key("Meta"), f"{name} has no Meta/fake kernel"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_forward_writes_in_place(layout):
    """forward_ writes its result into the input's own memory for every stride pattern."""
    x = random_input((4, 3, 5, 6), torch.float32, layout)
    ptr, strides = x.data_ptr(), x.stride()
    expected = x.clone()
    mean, var = torch.zeros(3), torch.ones(3)
    pure_backend.forward_(expected, mean, var, None, None, 1e-5, "leaky_relu", 0.1)
    torch.ops.inplace_abn.forward_(x, mean, var, None, None, 1e-5, "leaky_relu", 0.1)
    assert x.data_ptr() == ptr and x.stride() == strides
    torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_outputs_keep_the_input_strides(layout):
    """backward, backward_train and invert return tensors with y's strides (the residual's gradient too), as
    their fake kernels promise; without a residual its gradient is an empty (0,) tensor."""
    y = random_input((4, 3, 5, 6), torch.float32, layout)
    dy = torch.randn(4, 3, 5, 6)
    r = random_input((4, 3, 5, 6), torch.float32, "contiguous")  # any strides: read in y's layout
    var = torch.ones(3)
    for residual in (None, r):
        dx, dr = torch.ops.inplace_abn.backward(y, dy, var, None, None, None, None, 1e-5, "leaky_relu", 0.1, residual)
        dx2, _, _, dr2 = torch.ops.inplace_abn.backward_train(y, dy, var, None, None, 1e-5, "leaky_relu", 0.1, residual)
        xhat = torch.ops.inplace_abn.invert(y, None, None, 1e-5, "leaky_relu", 0.1, residual)
        for t in (dx, dx2, xhat) + ((dr, dr2) if residual is not None else ()):
            assert t.stride() == torch.empty_like(y).stride()
        if residual is None:
            assert dr.shape == dr2.shape == (0,)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_train_ops_equal_the_split_ops(dtype, layout, residual):
    """forward_train_ = statistics + forward_ + nn.BatchNorm's running update; backward_train =
    backward_reduce + backward, with grad_weight = sign(w) * sum_dz_xhat (sign(0) = +1) in the
    parameters' dtypes, on both backends; with a residual too (and the same residual gradient)."""
    torch.manual_seed(0)
    op_dtype = pure_backend.opmath_dtype(dtype)
    x = random_input((4, 5, 3, 7), dtype, layout)
    r = random_input((4, 5, 3, 7), dtype, "contiguous") if residual else None
    w = torch.tensor([0.5, -1.0, 0.0, 2.0, -0.25], dtype=op_dtype)  # negative and zero weights
    if residual:  # gamma = eps against a unit residual: the inversion is lossy there (test_residual.py), not the ops
        w[2] = 0.75
    b = torch.randn(5, dtype=op_dtype)
    count = x.numel() // 5
    for ops in (torch.ops.inplace_abn, pure_backend):
        y, rm, rv = x.clone(memory_format=torch.preserve_format), torch.randn(5), torch.rand(5) + 0.5
        rm0, rv0 = rm.clone(), rv.clone()
        mean, var = ops.forward_train_(y, w, b, rm, rv, 0.3, 1e-5, "leaky_relu", 0.05, r)
        ref_mean, ref_var = torch.ops.inplace_abn.statistics(x)
        ref_y = x.clone(memory_format=torch.preserve_format)
        torch.ops.inplace_abn.forward_(ref_y, ref_mean, ref_var, w, b, 1e-5, "leaky_relu", 0.05, r)
        tol = {"rtol": 2e-3, "atol": 2e-3} if dtype in (torch.float16, torch.bfloat16) else {}
        torch.testing.assert_close(mean, ref_mean, **tol)
        torch.testing.assert_close(var, ref_var, **tol)
        torch.testing.assert_close(y, ref_y, **tol)
        torch.testing.assert_close(rm, rm0 + 0.3 * (ref_mean.float() - rm0), **tol)
        torch.testing.assert_close(rv, rv0 + 0.3 * (ref_var.float() * count / (count - 1) - rv0), **tol)

        dy = torch.randn_like(y)
        dx, gw, gb, dr = ops.backward_train(y, dy, var, w, b, 1e-5, "leaky_relu", 0.05, r)
        s_dz, s_dz_xhat = torch.ops.inplace_abn.backward_reduce(y, dy, w, b, 1e-5, "leaky_relu", 0.05, r)
        ref_dx, ref_dr = torch.ops.inplace_abn.backward(
            y, dy, var, w, b, s_dz / count, s_dz_xhat / count, 1e-5, "leaky_relu", 0.05, r
        )
        assert gw.dtype == w.dtype and gb.dtype == b.dtype
        torch.testing.assert_close(dx, ref_dx, **tol)
        torch.testing.assert_close(dr, ref_dr, **tol)
        torch.testing.assert_close(gb, s_dz, **tol)
        sign = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=op_dtype)
        torch.testing.assert_close(gw, sign * s_dz_xhat, **tol)


def test_backward_train_without_affine_returns_the_raw_sums():
    y, dy, var = torch.randn(6, 3, 4), torch.randn(6, 3, 4), torch.rand(3) + 0.5
    _, gw, gb, _ = torch.ops.inplace_abn.backward_train(y, dy, var, None, None, 1e-5, "identity", 0.0)
    s_dz, s_dz_xhat = torch.ops.inplace_abn.backward_reduce(y, dy, None, None, 1e-5, "identity", 0.0)
    torch.testing.assert_close(gw, s_dz_xhat)
    torch.testing.assert_close(gb, s_dz)


@pytest.mark.parametrize(
    "running_mean, running_var, momentum, x_shape, match",
    [
        (torch.zeros(3), None, 0.1, (4, 3), "running_mean and running_var must be both"),
        (torch.zeros(4), torch.ones(4), 0.1, (4, 3), "running_mean must be a 1-D tensor with one entry per channel"),
        (torch.zeros(3), torch.ones(3, dtype=torch.int64), 0.1, (4, 3), "running_var must be a floating-point"),
        (torch.zeros(3), torch.ones(3), 1.5, (4, 3), "momentum must be in \\[0, 1\\]"),
        (torch.zeros(3), torch.ones(3), 0.1, (1, 3), "more than 1 value per channel"),
    ],
)
def test_forward_train_rejects_bad_running_stats(running_mean, running_var, momentum, x_shape, match):
    """The op checks its running-statistics arguments (the Python layer checks first; direct callers too)."""
    x = torch.randn(x_shape)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.inplace_abn.forward_train_(x, None, None, running_mean, running_var, momentum, 1e-5, "identity", 0.0)


@pytest.mark.parametrize("x_shape", [(1, 3), (1, 3, 1, 1), (0, 3, 4)])
def test_pure_forward_train_rejects_one_value_per_channel_like_the_op(x_shape):
    """The pure twin refuses what the compiled op refuses (the unbiased variance of <= 1 value), with the
    same message, before it writes anything; it neither divides by zero nor leaves NaN running stats."""
    x = torch.randn(x_shape)
    before, running_mean, running_var = x.clone(), torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="running_var: the unbiased batch variance needs more than 1 value"):
        pure_backend.forward_train_(x, None, None, running_mean, running_var, 0.1, 1e-5, "identity", 0.0)
    assert torch.equal(x, before)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))
