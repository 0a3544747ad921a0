"""Equivalence grid of the in-place layers against the float64 reference and against nn.BatchNorm + act.

(a) module ``InPlaceABN`` vs ``inplace_abn.reference.batch_norm_act`` (float64, autograd): output,
    running statistics, num_batches_tracked, dx, dweight, dbias over activations, backends, train/eval,
    affine, tracking, momentum (0.1 and None = cumulative), shapes, memory layouts and gradient layouts.
(b) vs ``nn.BatchNorm{1,2,3}d`` (weight |w| + eps) followed by the activation module.
(c) float64 ``torch.autograd.gradcheck`` through the functional API.
(d) reduced precision: bf16 / fp16 inputs with float32 parameters, and fully converted modules.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from helpers import ELU_HALF_TOL, EPS, ZERO_WEIGHT_F64_TOL, check_close, layout_input, make_weight, set_module_state

from inplace_abn import InPlaceABN
from inplace_abn.functions import inplace_abn
from inplace_abn.reference import batch_norm_act

ACTIVATIONS = [
    ("leaky_relu", 0.01),
    ("leaky_relu", 0.3),
    ("elu", 1.0),
    ("identity", 0.0),
    ("relu", 0.0),
]
ACT_IDS = [f"{a}-{p}" for a, p in ACTIVATIONS]

pytestmark = pytest.mark.filterwarnings("ignore:inplace_abn.*not invertible:RuntimeWarning")


def backward_with(y, grad_mode, g):
    """Backpropagates into ``y`` with a gradient of the requested layout; returns the dense dy used."""
    if grad_mode == "random":
        y.backward(g)
        return g
    if grad_mode == "expanded":
        # Per-channel constant gradient given as an expanded (stride-0) tensor.
        small = g.reshape(-1)[: y.size(1)].reshape((1, -1) + (1,) * (y.dim() - 2))
        dy = small.expand_as(y)
        assert dy.stride(0) == 0
        y.backward(dy)
        return dy.contiguous()
    if grad_mode == "sum":
        # loss = y.sum(): autograd hands the layer an expanded scalar gradient of ones.
        y.sum().backward()
        return torch.ones_like(g)
    if grad_mode == "transposed":
        # The layer receives a transposed (non-contiguous) view of a contiguous gradient.
        yt = y.transpose(0, -1)
        gt = g.transpose(0, -1).contiguous()
        yt.backward(gt)
        return gt.transpose(0, -1)
    raise AssertionError(grad_mode)


def run_equivalence(
    shape,
    activation,
    param,
    training,
    dtype=torch.float64,
    affine=True,
    track=True,
    momentum=0.1,
    steps=1,
    layout="contiguous",
    grad_mode="random",
    param_dtype=None,
    tol=None,
):
    """Runs InPlaceABN and the float64 reference side by side for ``steps`` steps and compares all."""
    c = shape[1]
    param_dtype = param_dtype or dtype
    m = InPlaceABN(c, EPS, momentum, affine, track, activation, param)
    set_module_state(m, c, torch.float64)
    m = m.to(param_dtype)
    m.train(training)
    # float64 copies for the reference (created from the module's possibly-rounded values).
    w_ref = m.weight.detach().double().clone().requires_grad_() if affine else None
    b_ref = m.bias.detach().double().clone().requires_grad_() if affine else None
    rm_ref = m.running_mean.detach().double().clone() if track else None
    rv_ref = m.running_var.detach().double().clone() if track else None
    for step in range(1, steps + 1):
        x0 = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).requires_grad_()
        g = torch.randn(shape, dtype=torch.float64).to(dtype)
        x = layout_input(x0, layout)
        # Reference: module rules (cumulative average for momentum None; batch stats without buffers).
        ref_training = training or not track
        ref_momentum = (1.0 / step if momentum is None else momentum) if (training and track) else 0.0
        xr = x0.detach().double().clone().requires_grad_()
        yr = batch_norm_act(
            xr, w_ref, b_ref, rm_ref if track else None, rv_ref if track else None,
            ref_training, ref_momentum, EPS, activation, param,
        )  # fmt: skip
        y = m(x)
        assert y is x
        assert y.dtype == dtype
        check_close(y, yr, dtype, f"output step {step}", tol=tol)
        dy = backward_with(y, grad_mode, g)
        yr.backward(dy.double())
        check_close(x0.grad, xr.grad, dtype, f"dx step {step}", tol=tol)
        if affine:
            # Gradients accumulate over steps on both sides.
            check_close(m.weight.grad, w_ref.grad, dtype, f"dweight step {step}", tol=tol)
            check_close(m.bias.grad, b_ref.grad, dtype, f"dbias step {step}", tol=tol)
        if track:
            check_close(m.running_mean, rm_ref, dtype, f"running_mean step {step}", tol=tol)
            check_close(m.running_var, rv_ref, dtype, f"running_var step {step}", tol=tol)
            assert m.num_batches_tracked.item() == (step if training else 0)
        else:
            assert m.running_mean is None and m.running_var is None and m.num_batches_tracked is None


# ---------------------------------------------------------------------------------------------------
# (a) against the float64 reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_activation_grid(backend, dtype, activation, param, training):
    """Full product activation x backend x train/eval x {float64, float32} on a prime-sized 4-D shape."""
    run_equivalence((5, 3, 7, 11), activation, param, training, dtype)


@pytest.mark.parametrize(
    "shape",
    [
        (3, 7),  # 2-D
        (4, 1),  # 2-D, C = 1
        (6, 5, 9),  # 3-D
        (5, 1, 7, 3),  # 4-D, C = 1
        (5, 3, 7, 11),  # 4-D, primes
        (2, 5, 3, 4, 5),  # 5-D
        (1, 4, 67, 71),  # N = 1 with a large spatial size
        (1, 2, 2),  # smallest trainable: 2 values per channel
    ],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_shapes(backend, dtype, shape, training):
    run_equivalence(shape, "leaky_relu", 0.01, training, dtype)


@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.01), ("elu", 1.0)], ids=["leaky", "elu"])
def test_affine_and_tracking(backend, activation, param, training, affine, track):
    """Eval without running buffers uses batch statistics (as nn.BatchNorm); no affine => g = 1, b = 0."""
    run_equivalence((4, 3, 5, 6), activation, param, training, torch.float64, affine=affine, track=track, steps=2)


@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0], ids=["0.1", "cumulative", "0", "1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_momentum_three_steps(backend, dtype, momentum):
    """Three training steps; momentum None is the cumulative average 1 / num_batches_tracked."""
    run_equivalence((4, 3, 5, 7), "leaky_relu", 0.01, True, dtype, momentum=momentum, steps=3)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "activation,param", [("leaky_relu", 0.01), ("elu", 1.0), ("relu", 0.0)], ids=["leaky", "elu", "relu"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_input_layouts(backend, dtype, activation, param, training, layout):
    """Non-contiguous inputs are overwritten through the view and give the same results."""
    run_equivalence((3, 4, 6, 5), activation, param, training, dtype, layout=layout)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_channels_last_3d(backend, dtype, training):
    run_equivalence((2, 3, 4, 5, 3), "leaky_relu", 0.01, training, dtype, layout="channels_last_3d")


def test_non_contiguous_input_is_written_through_view(backend):
    """The layer overwrites the viewed storage (the base buffer sees the output)."""
    base = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    expected = batch_norm_act(base.transpose(-1, -2).clone(), None, None, None, None, True, 0.1, EPS, "leaky_relu")
    view = base.transpose(-1, -2)
    y = inplace_abn(view, None, None, None, None, True, 0.1, EPS, "leaky_relu", 0.01)
    assert y is view
    check_close(base.transpose(-1, -2), expected, torch.float64, "output seen through the base buffer")


@pytest.mark.parametrize("grad_mode", ["expanded", "sum", "transposed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_gradient_layouts(backend, dtype, layout, training, grad_mode):
    """Expanded (stride 0) and transposed incoming gradients."""
    run_equivalence((3, 4, 6, 5), "leaky_relu", 0.1, training, dtype, layout=layout, grad_mode=grad_mode)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS, ids=ACT_IDS)
def test_zero_weight_float64(backend, activation, param, training):
    """A zero weight (g = eps) with a non-zero bias: the worst case of the inversion, float64."""
    c = 4
    w = make_weight(c, zero=True).requires_grad_()
    b = (torch.randn(c, dtype=torch.float64) + 1.0).requires_grad_()
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    x0 = torch.randn(4, c, 5, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, c, 5, 3, dtype=torch.float64)
    y = inplace_abn(x0.clone(), w, b, rm, rv, training, 0.1, EPS, activation, param)
    y.backward(g)
    wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    xr = x0.detach().clone().requires_grad_()
    yr = batch_norm_act(xr, wr, br, rm_ref, rv_ref, training, 0.1, EPS, activation, param)
    yr.backward(g)
    tol = ZERO_WEIGHT_F64_TOL
    check_close(y, yr, torch.float64, "output", tol=tol)
    check_close(x0.grad, xr.grad, torch.float64, "dx", tol=tol)
    check_close(w.grad, wr.grad, torch.float64, "dweight", tol=tol)
    check_close(b.grad, br.grad, torch.float64, "dbias", tol=tol)
    check_close(rm, rm_ref, torch.float64, "running_mean", tol=tol)
    check_close(rv, rv_ref, torch.float64, "running_var", tol=tol)


# ---------------------------------------------------------------------------------------------------
# (b) against nn.BatchNorm{1,2,3}d + activation module
# ---------------------------------------------------------------------------------------------------


def torch_activation(activation, param):
    if activation == "leaky_relu":
        return nn.LeakyReLU(param)
    if activation == "relu":
        return nn.ReLU()
    if activation == "elu":
        return nn.ELU(param)
    return nn.Identity()


BN_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 7), (3, 5, 4, 6), (2, 5, 3, 4, 3)], ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("dtype,zero", [(torch.float64, True), (torch.float32, False)], ids=["f64-zero-weight", "f32"])
def test_against_batchnorm(backend, dtype, zero, activation, param, training, shape):
    c = shape[1]
    w = make_weight(c, dtype=dtype, zero=zero)
    b = torch.randn(c, dtype=dtype) * 0.5
    m = InPlaceABN(c, EPS, 0.1, True, True, activation, param).to(dtype)
    bn = BN_CLASSES[len(shape)](c, eps=EPS, momentum=0.1).to(dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
        bn.weight.copy_(w.abs() + EPS)
        bn.bias.copy_(b)
        rm, rv = torch.randn(c, dtype=dtype) * 0.3, torch.rand(c, dtype=dtype) + 0.5
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
    ref = nn.Sequential(bn, torch_activation(activation, param))
    m.train(training)
    ref.train(training)
    tol = ZERO_WEIGHT_F64_TOL if dtype == torch.float64 else None
    for step in range(1, 3):
        x0 = (torch.randn(shape, dtype=dtype) * 2 - 0.3).requires_grad_()
        xr = x0.detach().clone().requires_grad_()
        g = torch.randn(shape, dtype=dtype)
        y = m(x0.clone())
        yr = ref(xr)
        check_close(y, yr, dtype, "output", tol=tol)
        y.backward(g)
        yr.backward(g)
        check_close(x0.grad, xr.grad, dtype, "dx", tol=tol)
        sign = torch.where(w >= 0, 1.0, -1.0).to(dtype)
        check_close(m.weight.grad, bn.weight.grad * sign, dtype, "dweight = dBN/dw_bn * sign(w)", tol=tol)
        check_close(m.bias.grad, bn.bias.grad, dtype, "dbias", tol=tol)
        check_close(m.running_mean, bn.running_mean, dtype, "running_mean", tol=tol)
        check_close(m.running_var, bn.running_var, dtype, "running_var", tol=tol)
        assert m.num_batches_tracked.item() == bn.num_batches_tracked.item() == (step if training else 0)


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_against_batchnorm_momentum_and_no_buffers(backend, momentum):
    """Cumulative average over 3 steps, and eval without running buffers, as nn.BatchNorm2d."""
    for track in (True, False):
        c = 3
        m = InPlaceABN(c, EPS, momentum, True, track, "elu", 0.5).double()
        bn = nn.BatchNorm2d(c, eps=EPS, momentum=momentum, track_running_stats=track).double()
        with torch.no_grad():
            w = make_weight(c)
            m.weight.copy_(w)
            bn.weight.copy_(w.abs() + EPS)
        ref = nn.Sequential(bn, nn.ELU(0.5))
        for mode in ("train", "train", "train", "eval"):
            m.train(mode == "train")
            ref.train(mode == "train")
            x = torch.randn(4, c, 5, 5, dtype=torch.float64)
            check_close(m(x.clone()), ref(x), torch.float64, f"output {mode} track={track}")
            if track:
                check_close(m.running_mean, bn.running_mean, torch.float64, f"running_mean {mode}")
                check_close(m.running_var, bn.running_var, torch.float64, f"running_var {mode}")
                assert m.num_batches_tracked.item() == bn.num_batches_tracked.item()


# ---------------------------------------------------------------------------------------------------
# (c) gradcheck through the functional API
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 2, 3, 2)], ids=["3d", "4d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "activation,param", [("leaky_relu", 0.01), ("leaky_relu", 0.3), ("elu", 1.0), ("identity", 0.0)],
    ids=["leaky0.01", "leaky0.3", "elu", "identity"],
)  # fmt: skip
def test_gradcheck(backend, activation, param, training, shape):
    c = shape[1]
    # Inputs away from the activation kink at 0 are not guaranteed; gradcheck's 1e-6 step rarely crosses it.
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([-1.3, 0.7, 2.1][:c], dtype=torch.float64, requires_grad=True)  # no zero: |w| kink
    b = (torch.randn(c, dtype=torch.float64) * 0.5).requires_grad_()
    rm, rv = torch.randn(c, dtype=torch.float64) * 0.2, torch.rand(c, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        if training:
            return inplace_abn(x.clone(), w, b, None, None, True, 0.1, EPS, activation, param)
        return inplace_abn(x.clone(), w, b, rm.clone(), rv.clone(), False, 0.1, EPS, activation, param)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_no_affine(backend):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda x: inplace_abn(x.clone(), None, None, None, None, True, 0.1, EPS, "elu", 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# (d) reduced precision
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "activation,param", [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0)], ids=["leaky", "elu", "identity"]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_mixed_precision(backend, dtype, activation, param, training):
    """Half-precision activations with float32 parameters and buffers (autocast-style)."""
    tol = ELU_HALF_TOL if activation == "elu" and training else None
    run_equivalence((4, 3, 6, 7), activation, param, training, dtype, param_dtype=torch.float32, steps=2, tol=tol)
    # A default float32 layer (weight 1, bias 0, stats 0 / 1) on a half input: half output, float32 state,
    # and the values of the float64 reference on the same (half-rounded) input.
    m = InPlaceABN(3).train(training)
    x = torch.randn(2, 3, 4, 4).to(dtype)
    rm_ref, rv_ref = m.running_mean.double().clone(), m.running_var.double().clone()
    expected = batch_norm_act(x.double(), m.weight.double(), m.bias.double(), rm_ref, rv_ref, training, 0.1, EPS,
                              "leaky_relu", 0.01)  # fmt: skip
    y = m(x)
    assert y.dtype == dtype and m.weight.dtype == torch.float32 and m.running_mean.dtype == torch.float32
    check_close(y, expected, dtype, "output of a default layer")
    check_close(m.running_mean, rm_ref, dtype, "running_mean of a default layer")
    check_close(m.running_var, rv_ref, dtype, "running_var of a default layer")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("convert", ["half", "bfloat16"])
def test_converted_module(backend, convert, training):
    """module.half() / .bfloat16(): parameters and buffers in reduced precision too."""
    dtype = torch.float16 if convert == "half" else torch.bfloat16
    m = InPlaceABN(3, activation="leaky_relu", activation_param=0.1)
    set_module_state(m, 3, torch.float32)
    m = getattr(m, convert)()
    assert m.weight.dtype == m.running_var.dtype == dtype
    assert m.num_batches_tracked.dtype == torch.long
    run_equivalence((4, 3, 6, 7), "leaky_relu", 0.1, training, dtype, param_dtype=dtype, steps=2)
    m2 = copy.deepcopy(m).train(training)
    x = torch.randn(4, 3, 6, 7).to(dtype)
    rm_ref, rv_ref = m.running_mean.double().clone(), m.running_var.double().clone()
    expected = batch_norm_act(x.double(), m.weight.double(), m.bias.double(), rm_ref, rv_ref, training, 0.1, EPS,
                              "leaky_relu", 0.1)  # fmt: skip
    y = m2(x)
    assert y.dtype == dtype and m2.running_mean.dtype == dtype
    check_close(y, expected, dtype, "output of the converted copy")
    check_close(m2.running_mean, rm_ref, dtype, "running_mean of the converted copy")
    check_close(m2.running_var, rv_ref, dtype, "running_var of the converted copy")
    assert m2.num_batches_tracked.item() == (1 if training else 0)
