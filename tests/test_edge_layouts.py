"""Edges the other tables miss: per-channel vectors passed as strided views, an output exactly 0 (a dead
channel), and the inversion on channels_last / channels_last_3d / (N, C) inputs, each on both backends
against a contiguous run or the float64 reference's autograd."""

from __future__ import annotations

import pytest
import torch

from inplace_abn import reference
from inplace_abn.functions import inplace_abn as iabn
from inplace_abn.functions import recover_normalized_input

C = 3
EPS = 1e-5


def _strided(values: torch.Tensor, step: int, offset: int) -> torch.Tensor:
    """A (C,) view with stride ``step`` into a larger buffer (filled with sentinels elsewhere)."""
    buf = torch.full((offset + step * values.numel(),), -7.0, dtype=values.dtype)
    view = buf[offset::step]
    view.copy_(values)
    assert view.stride() == (step,) and view._base is buf
    return view


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation, param", [("leaky_relu", 0.1), ("elu", 0.7), ("identity", 0.0)])
def test_strided_per_channel_vectors_match_contiguous_copies(backend, training, activation, param):
    torch.manual_seed(0)
    x0 = torch.randn(4, C, 5, dtype=torch.float64)
    dy = torch.randn_like(x0)
    w0 = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)
    b0 = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    rm0 = torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64)
    rv0 = torch.tensor([1.5, 0.7, 1.1], dtype=torch.float64)
    runs = {}
    for kind in ("contiguous", "strided"):
        if kind == "contiguous":
            w, b, rm, rv = w0.clone(), b0.clone(), rm0.clone(), rv0.clone()
        else:
            w, b, rm, rv = _strided(w0, 2, 0), _strided(b0, 3, 1), _strided(rm0, 2, 1), _strided(rv0, 4, 2)
        w.requires_grad_()
        b.requires_grad_()
        x = x0.clone().requires_grad_()
        y = iabn(x * 1.0, w, b, rm, rv, training, 0.1, EPS, activation, param)
        out = y.detach().clone()
        y.backward(dy)
        runs[kind] = (out, x.grad, w.grad, b.grad, rm.clone(), rv.clone())
        if kind == "strided":  # the writes went into the views only, not the sentinels around them
            for v in (rm, rv):
                untouched = torch.ones_like(v._base, dtype=torch.bool)
                untouched[v.storage_offset() :: v.stride(0)] = False
                assert (v._base[untouched] == -7.0).all()
    for name, a, b_ in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), *runs.values()):
        torch.testing.assert_close(b_, a, msg=name)
    if training:
        assert not torch.equal(runs["strided"][4], rm0)  # the running statistics were updated


@pytest.mark.parametrize("activation, param", [("leaky_relu", 0.01), ("leaky_relu", 0.3), ("elu", 0.5), ("elu", 2.0)])
def test_output_exactly_zero_takes_pytorchs_derivative_side(backend, activation, param):
    """A constant channel with zero bias gives y == 0 exactly: the backward must take the side PyTorch's
    autograd takes at 0 (the slope / alpha side), as the float64 reference does."""
    torch.manual_seed(0)
    x0 = torch.randn(4, C, 6, dtype=torch.float64)
    x0[:, 1] = 0.0  # dead channel (e.g. behind a dead ReLU): x_hat == 0 exactly
    dy = torch.randn_like(x0)
    w0 = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)
    b0 = torch.tensor([0.1, 0.0, -0.3], dtype=torch.float64)
    grads = []
    for layer in (iabn, reference.batch_norm_act):
        x = x0.clone().requires_grad_()
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = layer(x * 1.0, w, b, None, None, True, 0.1, EPS, activation, param)
        if layer is iabn:
            assert (y[:, 1] == 0).all()
        y.backward(dy)
        grads.append((x.grad, w.grad, b.grad))
    for name, got, want in zip(("dx", "dweight", "dbias"), *grads):
        torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize(
    "shape, layout",
    [((4, C, 5, 6), torch.channels_last), ((2, C, 3, 4, 5), torch.channels_last_3d), ((7, C), None)],
    ids=["channels_last", "channels_last_3d", "NC"],
)
@pytest.mark.parametrize("activation, param", [("leaky_relu", 0.1), ("elu", 0.7), ("identity", 0.0)])
def test_invert_on_other_layouts_matches_contiguous(backend, shape, layout, activation, param):
    torch.manual_seed(0)
    y = torch.randn(*shape, dtype=torch.float64)
    if activation == "elu":
        y = y.clamp(min=-0.5 * param)  # a valid ELU output
    w = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    want = recover_normalized_input(y.contiguous(), w, b, EPS, activation, param)
    other = y.contiguous(memory_format=layout) if layout is not None else y.t().contiguous().t()
    assert not other.is_contiguous()
    got = recover_normalized_input(other, w, b, EPS, activation, param)
    torch.testing.assert_close(got, want)
    # and the inversion is the forward's inverse: x_hat -> y again
    z = want * (w.abs() + EPS).view(1, C, *([1] * (len(shape) - 2))) + b.view(1, C, *([1] * (len(shape) - 2)))
    from inplace_abn import activations

    torch.testing.assert_close(activations.get(activation).apply(z, param), y)
