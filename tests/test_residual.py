"""The fused residual layer ``act(BN(x) + residual)`` (issue 14): gradients, equality with ``ABN`` (BatchNorm +
add + activation), autograd safety, argument checks, layouts, half precision and torch.compile.

The float64 reference is written here with plain autograd ops (``_reference``): batch_norm with the in-place
layer's scale ``|w| + eps`` (``reference.in_place_scale``: sign(0) = +1, the layer's convention), then
``+ residual``, then the activation; ``inplace_abn.reference`` itself takes no residual.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import EPS, aot_recording_backend, check_close, make_weight, random_input, tolerance
from torch.testing import assert_close

from inplace_abn import ABN, InPlaceABN, InPlaceABNSync, activations, functions, pure_backend, to_batchnorm
from inplace_abn.functions import inplace_abn as iabn_fn
from inplace_abn.functions import inplace_abn_sync as iabn_sync_fn
from inplace_abn.memory import parameters_of, saved_tensor_bytes
from inplace_abn.reference import in_place_scale

ACTS = [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0), ("relu", 0.0)]
FUNCTIONS = {"local": iabn_fn, "sync": iabn_sync_fn}
MODULES = [InPlaceABN, InPlaceABNSync]


def _act_id(act):
    return act[0] if act[0] in ("identity", "relu") else f"{act[0]}[{act[1]:g}]"


@contextlib.contextmanager
def quiet():
    """Silences the expected RuntimeWarnings: sync without torch.distributed, ReLU not invertible, and the
    fused layer keeping x_hat (each is said once per process and tested where it is the subject)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _channel(v, x):
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def _reference(x, w, b, rm, rv, training, momentum, eps, act, param, residual):
    """Float64 ``act(batch_norm(x; |w| + eps, b) + residual)`` from standard autograd ops (updates rm / rv
    in training, as F.batch_norm does: unbiased variance)."""
    scale = None if w is None else in_place_scale(w.double(), eps)
    bias = None if b is None else b.double()
    rm64 = None if rm is None else rm.double().clone()
    rv64 = None if rv is None else rv.double().clone()
    z = F.batch_norm(x.double(), rm64, rv64, scale, bias, training, momentum, eps) + residual.double()
    if rm is not None:
        with torch.no_grad():
            rm.copy_(rm64)
            rv.copy_(rv64)
    name, p = activations.resolve(act, param)
    return activations.get(name).apply(z, p)


def _to_layout(t, layout):
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
        assert not t.is_contiguous()
    return t


# ---------------------------------------------------------------------------------------------------
# gradcheck (float64) with respect to x, residual, weight and bias
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("fn_name", list(FUNCTIONS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTS, ids=_act_id)
def test_gradcheck(backend, act, training, fn_name, layout):
    fn = FUNCTIONS[fn_name]
    c = 3
    x0 = _to_layout(torch.randn(2, c, 3, 4, dtype=torch.float64), layout).requires_grad_()
    r0 = _to_layout(torch.randn(2, c, 3, 4, dtype=torch.float64), layout).requires_grad_()
    w = make_weight(c).requires_grad_()  # |w| >= 0.2: away from the kink of |w| at 0
    b = (torch.randn(c, dtype=torch.float64) * 0.5).requires_grad_()
    rm = torch.randn(c, dtype=torch.float64) * 0.3
    rv = torch.rand(c, dtype=torch.float64) + 0.5

    def layer(x, r, w, b):
        # The layer overwrites its input: feed it a non-leaf copy (in x's layout).
        return fn(x.clone(), w, b, rm, rv, training, 0.1, EPS, act[0], act[1], residual=r)

    with quiet():
        assert torch.autograd.gradcheck(layer, (x0, r0, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("act", ACTS, ids=_act_id)
def test_gradcheck_kept_xhat(backend, act, monkeypatch):
    """The lossy path (tiny weight against the residual: those channels' x_hat is kept, not recovered) has
    exact gradients too, next to a recovered channel. w = 2e-5 (A >= 2e4 > 16384 for max|r| >= 0.6) is small
    enough to be lossy and large enough that the finite differences never cross the kink of |w| at 0."""
    decisions = []
    real = functions.residual_lossy_channels
    monkeypatch.setattr(functions, "residual_lossy_channels", lambda *a: decisions.append(real(*a)) or decisions[-1])
    c = 3
    x0 = torch.randn(2, c, 3, 4, dtype=torch.float64, requires_grad=True)
    r0 = torch.randn(2, c, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([2e-5, -2e-5, 0.5], dtype=torch.float64, requires_grad=True)
    b = (torch.randn(c, dtype=torch.float64) * 0.5).requires_grad_()

    def layer(x, r, w, b):
        return iabn_fn(x.clone(), w, b, None, None, True, 0.1, EPS, act[0], act[1], residual=r)

    with quiet():
        assert torch.autograd.gradcheck(layer, (x0, r0, w, b), eps=1e-7, atol=1e-5, rtol=1e-4)
    assert decisions and all(d is not None and d.tolist() == [0, 1] for d in decisions), decisions


# ---------------------------------------------------------------------------------------------------
# equality with ABN (BatchNorm + add + activation), float64
# ---------------------------------------------------------------------------------------------------


def _weights(case, c):
    if case == "random":  # mixed signs, |w| >= 0.2 (x_hat recovered from y)
        return make_weight(c)
    if case == "zero":  # torchvision zero_init_residual (x_hat kept: A = O(1) / eps)
        return torch.zeros(c, dtype=torch.float64)
    if case == "negative":
        return -(torch.rand(c, dtype=torch.float64) + 0.5)
    if case == "mixed":  # one zero, one negative, the others random
        return make_weight(c, zero=True)
    raise AssertionError(case)


@pytest.mark.parametrize("weights", ["random", "zero", "negative", "mixed"])
@pytest.mark.parametrize("act", ACTS, ids=_act_id)
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_equals_abn(backend, cls, act, weights, monkeypatch):
    """Also checks which path each case takes: x_hat kept for the zero channels (A ~ 1e6 > 16384), recovered
    for |w| >= 0.2 (A <= ~40)."""
    decisions = []
    real = functions.residual_lossy_channels
    monkeypatch.setattr(functions, "residual_lossy_channels", lambda *a: decisions.append(real(*a)) or decisions[-1])
    expected_lossy = {"random": None, "negative": None, "zero": [0, 1, 2, 3, 4], "mixed": [4]}[weights]
    c = 5
    with quiet():
        m = cls(c, activation=act[0], activation_param=act[1]).double()
    ref = ABN(c, activation=act[0], activation_param=act[1]).double()
    w = _weights(weights, c)
    with torch.no_grad():
        m.weight.copy_(w)
        ref.weight.copy_(w.abs() + EPS)
        for mod in (m, ref):
            mod.bias.copy_(torch.randn(c, dtype=torch.float64) * 0.5)
            mod.running_mean.fill_(0.2)
            mod.running_var.fill_(1.5)
            mod.num_batches_tracked.fill_(3)
        ref.bias.copy_(m.bias)
    sign = torch.where(w >= 0, 1.0, -1.0).to(torch.float64)

    for step, training in enumerate([True, True, False]):
        m.train(training)
        ref.train(training)
        x = torch.randn(4, c, 5, 3, dtype=torch.float64) * 2.0 + 0.5
        r = torch.randn(x.shape, dtype=torch.float64) * 1.5
        dy = torch.randn(x.shape, dtype=torch.float64)
        xs, rs = [x.clone().requires_grad_() for _ in range(2)], [r.clone().requires_grad_() for _ in range(2)]
        with quiet():
            y = m(xs[0] * 1.0, rs[0])
        y_ref = ref(xs[1] * 1.0, rs[1])
        y.backward(dy)
        y_ref.backward(dy)
        tag = f"step {step} ({'train' if training else 'eval'})"
        check_close(y, y_ref, torch.float64, f"output {tag}")
        check_close(xs[0].grad, xs[1].grad, torch.float64, f"dx {tag}")
        check_close(rs[0].grad, rs[1].grad, torch.float64, f"dresidual {tag}")
        check_close(m.weight.grad, sign * ref.weight.grad, torch.float64, f"dweight {tag}")
        check_close(m.bias.grad, ref.bias.grad, torch.float64, f"dbias {tag}")
        check_close(m.running_mean, ref.running_mean, torch.float64, f"running_mean {tag}")
        check_close(m.running_var, ref.running_var, torch.float64, f"running_var {tag}")
        assert m.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3 + min(step + 1, 2)
        for p in (m.weight, m.bias, ref.weight, ref.bias):
            p.grad = None
    assert len(decisions) == 3
    assert all((d if d is None else d.tolist()) == expected_lossy for d in decisions), decisions


def test_functional_equals_reference_with_running_stats(backend):
    """The functional layer (not through a module) against _reference: output, grads and running stats."""
    c = 4
    x = torch.randn(3, c, 7, dtype=torch.float64)
    r = torch.randn(x.shape, dtype=torch.float64)
    w, b = make_weight(c), torch.randn(c, dtype=torch.float64)
    dy = torch.randn(x.shape, dtype=torch.float64)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    args = [t.clone().requires_grad_() for t in (x, r, w, b)]
    refs = [t.clone().requires_grad_() for t in (x, r, w, b)]
    y = iabn_fn(args[0] * 1.0, args[2], args[3], rm, rv, True, 0.3, EPS, "elu", 1.0, residual=args[1])
    y_ref = _reference(refs[0], refs[2], refs[3], rm_ref, rv_ref, True, 0.3, EPS, "elu", 1.0, refs[1])
    y.backward(dy)
    y_ref.backward(dy)
    check_close(y, y_ref, torch.float64, "output")
    for name, a, e in zip(("dx", "dresidual", "dweight", "dbias"), args, refs):
        check_close(a.grad, e.grad, torch.float64, name)
    check_close(rm, rm_ref, torch.float64, "running_mean")
    check_close(rv, rv_ref, torch.float64, "running_var")


# ---------------------------------------------------------------------------------------------------
# autograd safety: the residual is kept by reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [True, False], ids=["residual-grad", "residual-no-grad"])
@pytest.mark.parametrize("weight", [1.0, 0.0], ids=["recovered", "kept-xhat"])
def test_residual_modified_before_backward_raises(backend, weight, requires_grad):
    c = 3
    x = torch.randn(4, c, 5, requires_grad=True)
    base = torch.randn(4, c, 5, requires_grad=requires_grad)
    r = base * 1.0 if requires_grad else base
    w = torch.full((c,), weight, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    with quiet():
        y = iabn_fn(x * 1.0, w, b, None, None, True, 0.1, EPS, "leaky_relu", 0.01, residual=r)
    with torch.no_grad():
        r.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    assert x.grad is None and w.grad is None  # no (wrong) gradient was produced


# ---------------------------------------------------------------------------------------------------
# bad input: refused before anything is written
# ---------------------------------------------------------------------------------------------------


def _bad_residuals(x):
    n, c, h, w = x.shape
    return {
        "broadcastable": (torch.randn(n, c, 1, 1), ValueError, "residual must have the shape of x"),
        "other-shape": (torch.randn(n, c, h, w + 1), ValueError, "residual must have the shape of x"),
        "fewer-dims": (torch.randn(n, c, h * w), ValueError, "residual must have the shape of x"),
        "dtype": (torch.randn(x.shape, dtype=torch.float64), TypeError, "residual has dtype torch.float64"),
        "half-dtype": (torch.randn(x.shape).half(), TypeError, "residual has dtype torch.float16"),
        "non-tensor": (1.0, TypeError, "residual must be a torch.Tensor or None, got float"),
        "list": ([[1.0]], TypeError, "residual must be a torch.Tensor or None, got list"),
        "device": (torch.empty(x.shape, device="meta"), ValueError, "residual is on meta"),
        "is-x": (x, ValueError, "residual shares memory with x"),
        "view-of-x": (x.view(x.shape), ValueError, "residual shares memory with x"),
        "detached-x": (x.detach(), ValueError, "residual shares memory with x"),
        "transposed-view": (x.transpose(2, 3).transpose(2, 3), ValueError, "residual shares memory with x"),
    }


BAD = list(_bad_residuals(torch.empty(2, 3, 4, 5)))


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("caller", ["InPlaceABN", "InPlaceABNSync", "inplace_abn", "inplace_abn_sync"])
def test_bad_residual_is_refused_and_nothing_written(backend, caller, case):
    base = torch.randn(2, 3, 4, 5, requires_grad=True)
    x = base * 1.0
    bad, error, match = _bad_residuals(x)[case]
    x_before = x.detach().clone()
    m = (InPlaceABNSync if "Sync" in caller or "sync" in caller else InPlaceABN)(3)
    with torch.no_grad():
        m.running_mean.fill_(0.25)
        m.running_var.fill_(2.0)
        m.num_batches_tracked.fill_(5)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with quiet(), pytest.raises(error, match=match):
        if caller.startswith("InPlace"):
            m(x, bad)
        else:
            fn = iabn_sync_fn if caller.endswith("sync") else iabn_fn
            fn(x, m.weight, m.bias, m.running_mean, m.running_var, True, 0.1, EPS, "leaky_relu", 0.01, residual=bad)
    assert_close(x.detach(), x_before, rtol=0, atol=0)
    assert x._version == 0
    for k, v in m.state_dict().items():
        assert_close(v, state[k], rtol=0, atol=0, msg=f"{k} changed by a refused call")


def test_residual_equal_values_but_separate_memory_is_accepted(backend):
    """Only shared memory is refused, not equal values: residual = x.clone() is the documented fix."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    w, b = make_weight(3), torch.randn(3, dtype=torch.float64)
    y = iabn_fn(x.clone(), w, b, None, None, True, 0.1, EPS, "identity", 0.0, residual=x.clone())
    y_ref = _reference(x, w, b, None, None, True, 0.1, EPS, "identity", 0.0, x)
    check_close(y, y_ref, torch.float64, "output")


# ---------------------------------------------------------------------------------------------------
# residual strides other than x's
# ---------------------------------------------------------------------------------------------------


def _strided(shape, layout, dtype=torch.float64):
    t = torch.randn(shape, dtype=dtype)
    if layout == "contiguous":
        return t
    if layout == "channels_last":
        return _to_layout(t, "channels_last")
    if layout == "strided":  # every other column of a wider buffer
        wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype)
        wide[..., ::2] = t
        view = wide[..., ::2]
        assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
        return view
    if layout == "transposed":
        view = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not view.is_contiguous()
        return view
    raise AssertionError(layout)


@pytest.mark.parametrize(
    "x_layout,r_layout",
    [("channels_last", "contiguous"), ("contiguous", "channels_last"), ("contiguous", "strided"),
     ("channels_last", "strided"), ("contiguous", "transposed"), ("channels_last", "channels_last")],
)  # fmt: skip
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", [("leaky_relu", 0.01), ("elu", 1.0), ("relu", 0.0)], ids=_act_id)
def test_residual_strides(backend, act, training, x_layout, r_layout):
    c = 4
    shape = (3, c, 5, 6)
    x0 = torch.randn(shape, dtype=torch.float64)
    r0 = _strided(shape, r_layout)
    w, b = make_weight(c), torch.randn(c, dtype=torch.float64) * 0.5
    rm, rv = torch.randn(c, dtype=torch.float64) * 0.3, torch.rand(c, dtype=torch.float64) + 0.5
    dy = torch.randn(shape, dtype=torch.float64)

    xl = x0.clone().requires_grad_()
    rl = r0.detach().requires_grad_()  # a leaf with r0's strides
    wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
    x = _to_layout(xl.clone(), x_layout)
    with quiet():
        y = iabn_fn(x, wl, bl, rm.clone(), rv.clone(), training, 0.1, EPS, act[0], act[1], residual=rl)
    assert y is x and y.stride() == _to_layout(x0.clone(), x_layout).stride()  # written in place, x's layout
    y.backward(dy)

    refs = [t.detach().clone().requires_grad_() for t in (x0, r0, w, b)]
    y_ref = _reference(refs[0], refs[2], refs[3], rm.clone(), rv.clone(), training, 0.1, EPS, *act, refs[1])
    y_ref.backward(dy)
    check_close(y, y_ref, torch.float64, "output")
    for name, a, e in zip(("dx", "dresidual", "dweight", "dbias"), (xl, rl, wl, bl), refs):
        check_close(a.grad, e.grad, torch.float64, name)


# ---------------------------------------------------------------------------------------------------
# half precision (float32 parameters) vs the float64 reference of the same rounded inputs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("act", ACTS, ids=_act_id)
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_half_precision(backend, cls, act, dtype):
    c = 6
    with quiet():
        m = cls(c, activation=act[0], activation_param=act[1])  # float32 parameters
    with torch.no_grad():
        m.weight.copy_(make_weight(c).float())
        m.bias.copy_(torch.randn(c) * 0.5)
    x = (torch.randn(4, c, 6, 5) * 2.0 + 1.0).to(dtype)
    r = torch.randn(x.shape).to(dtype)
    dy = torch.randn(x.shape).to(dtype)
    xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
    with quiet():
        y = m(xl * 1.0, rl)
    assert y.dtype == dtype
    y.backward(dy)
    assert xl.grad.dtype == rl.grad.dtype == dtype and m.weight.grad.dtype == torch.float32

    refs = [t.detach().double().requires_grad_() for t in (x, r, m.weight, m.bias)]
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    y_ref = _reference(refs[0], refs[2], refs[3], rm, rv, True, 0.1, EPS, *act, refs[1])
    y_ref.backward(dy.double())
    count = x.numel() // c
    tol = tolerance(dtype, act[0], training=True)
    check_close(y, y_ref, tol=tolerance(dtype, act[0], training=False), label="output")
    check_close(xl.grad, refs[0].grad, tol=tol, label="dx")
    check_close(rl.grad, refs[1].grad, tol=tol, label="dresidual")
    check_close(m.weight.grad, refs[2].grad, tol=tol, label="dweight", min_scale=count**0.5)
    check_close(m.bias.grad, refs[3].grad, tol=tol, label="dbias", min_scale=count**0.5)
    check_close(m.running_mean, rm, tol=(1e-5, 1e-5), label="running_mean")  # statistics in float32
    check_close(m.running_var, rv, tol=(1e-5, 1e-5), label="running_var")


# ---------------------------------------------------------------------------------------------------
# torch.compile of a residual block
# ---------------------------------------------------------------------------------------------------


class FusedBlock(nn.Module):
    """torchvision BasicBlock with In-Place ABN: conv -> iabn(leaky_relu) -> conv -> iabn(x, residual)."""

    def __init__(self, c=8, zero_init=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = InPlaceABN(c, activation="leaky_relu", activation_param=0.01)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = InPlaceABN(c, activation="leaky_relu", activation_param=0.01)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.weight.copy_(make_weight(c).float())
                bn.bias.copy_(torch.randn(c) * 0.3)
            if zero_init:
                self.bn2.weight.zero_()

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(out), x)


# The fused layer compiles into the model's graph (fullgraph=True): its lossy-channel decision is an op of
# data-dependent size (functions._lossy_channels). Without fullgraph, dynamo graph-breaks on that op; the layer
# then starts the next graph with the tensor it overwrites as a graph input, where AOTAutograd (aot_eager,
# inductor; torch 2.13, 2.14) used to drop the layer's backward: dx came out as dy, silently
# (functions._apply). The zero-initialised cases keep x_hat of every channel, the others of none.
@pytest.mark.parametrize(
    "compiler,zero_init,fullgraph",
    [
        ("eager", False, False),
        ("aot_eager", False, False),
        ("aot_eager", True, False),
        ("aot_eager", False, True),
        ("aot_eager", True, True),
        ("inductor", False, False),
        ("inductor", True, True),
    ],
    ids=[
        "eager",
        "aot_eager",
        "aot_eager-zero-init",
        "aot_eager-fullgraph",
        "aot_eager-fullgraph-zero-init",
        "inductor",
        "inductor-fullgraph-zero-init",
    ],
)
def test_compiled_block_matches_eager(backend, compiler, zero_init, fullgraph):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = FusedBlock(zero_init=zero_init).double()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=compiler, fullgraph=fullgraph)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    dy = torch.randn(x.shape, dtype=torch.float64)
    results = []
    for model in (eager, compiled):
        xl = x.clone().requires_grad_()
        with quiet():
            y = model(xl)
        y.backward(dy)
        results.append((y.detach(), xl.grad))
    named_compiled = dict(compiled_model.named_parameters())
    tol = (1e-11, 1e-11)  # COMPILED_TOLERANCES[float64]: the same kernels, only pointwise glue may differ
    check_close(results[1][0], results[0][0], tol=tol, label="output")
    check_close(results[1][1], results[0][1], tol=tol, label="dx")
    for name, p in eager.named_parameters():
        check_close(named_compiled[name].grad, p.grad, tol=tol, label=f"grad {name}")
    for name, buf in eager.named_buffers():
        assert_close(dict(compiled_model.named_buffers())[name], buf, rtol=1e-11, atol=1e-11, msg=name)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# The two ops of the lossy-channel decision (functions.py: defined in Python, present on both backends)
# ---------------------------------------------------------------------------------------------------


def _decision_op_samples(dtype):
    amplification = torch.tensor([3.0, 2e5, 0.5, 1e9, float("nan")], dtype=pure_backend.opmath_dtype(dtype))
    for limit in (1e10, 16384.0, 0.0):  # none, some, all but NaN above the limit
        yield torch.ops.inplace_abn.lossy_channels.default, (amplification, limit)
    for shape, layout in [((4, 5, 3, 2), "contiguous"), ((4, 5, 3, 2), "channels_last"), ((3, 5), "contiguous"),
                          ((2, 5, 2, 3, 2), "strided"), ((0, 5, 3), "contiguous")]:  # fmt: skip
        for channels in ([], [1, 3], [0, 1, 2, 3, 4]):
            x = random_input(shape, dtype, layout)
            yield torch.ops.inplace_abn.keep_channels_.default, (x, torch.tensor(channels, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_decision_ops_pass_opcheck(dtype):
    """lossy_channels and keep_channels_ pass every check of torch.library.opcheck (schema, fake kernel of
    data-dependent size, AOT dispatch); keep_channels_ leaves x unchanged and copies exactly its channels."""
    for op, args in _decision_op_samples(dtype):
        if op is torch.ops.inplace_abn.keep_channels_.default:
            x, channels = args
            before = x.clone()
            kept = op(x, channels)
            assert torch.equal(x, before), "keep_channels_ changed x"
            assert kept.is_contiguous() and torch.equal(kept, before.index_select(1, channels))
        result = torch.library.opcheck(op, args)
        failed = {k: v for k, v in result.items() if v != "SUCCESS"}
        assert not failed, f"{op} {dtype}: {failed}"
    found = torch.ops.inplace_abn.lossy_channels(torch.tensor([3.0, 2e5, 0.5, 1e9]), 16384.0)
    assert found.tolist() == [1, 3]


def _amplification(bn, residual):
    """(amplification per channel, limit) of residual_lossy_channels for a float32 layer ``bn``."""
    with torch.no_grad():
        reach = (residual.abs().amax((0, 2, 3)) + bn.bias.abs()) / (bn.weight.abs() + bn.eps)
    return reach, functions.residual_amplification_limit(torch.float32)


@pytest.mark.parametrize("partition", ["default", "min_cut"])
def test_compiled_block_keeps_only_the_lossy_channels(backend, partition):
    """Compiled (fullgraph), a fused block with 3 of 8 lossy channels keeps for backward: its input x (conv1's
    input and the residual), y1, y2 and the 3 lossy channels' x_hat, not a copy of conv2's output. As a
    recomputable aten op the copy of those channels was moved into backward, and min_cut kept all of conv2's
    output for it (functions._keep_channels_)."""
    backend_fn, graphs = aot_recording_backend(partition)
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = FusedBlock()
    with torch.no_grad():
        block.bn2.weight[:3] = 0.0  # lossy: amplification (max|r| + |b|) / eps far above 16384
    compiled = torch.compile(block, backend=backend_fn, fullgraph=True)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with quiet():
        compiled(x).sum().backward()
    saved = [
        n.meta["val"] for n in graphs["bw"].graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")
    ]
    # the kept channels' count is symbolic (data-dependent) in the graph: compare shapes as text
    shapes = sorted(
        str(tuple(v.shape)) for v in saved if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] == 2
    )
    assert shapes == ["(2, 8, 6, 6)"] * 3 + ["(2, u0, 6, 6)"], shapes
    with quiet():
        assert torch.ops.inplace_abn.lossy_channels(*_amplification(block.bn2, x)).tolist() == [0, 1, 2]
    torch._dynamo.reset()


# Under torch.compile with an activation-memory budget below 1 the layer traces as standard ops
# (functions._compiler_recomputes), so that the budget's partitioner can recompute it.
def _compiled_step(model, budget, x):
    import torch._functorch.config as functorch_config  # the budget's documented knob

    namespace = {}
    exec("def step(m, x):\n    return m(x)\n", namespace)  # a fresh code object: no graph shared across budgets
    compiled = torch.compile(namespace["step"], fullgraph=True)
    with functorch_config.patch(activation_memory_budget=budget):
        compiled(model, x.clone().requires_grad_()).sum().backward()  # compiles outside the count
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        total, loss, per_storage = saved_tensor_bytes(
            lambda: compiled(model, xi).sum(), exclude=parameters_of(model) + [xi]
        )
        loss.backward()
    return (total, len(per_storage)), xi.grad


def test_compiled_under_a_memory_budget_keeps_what_the_compiler_keeps(backend):
    """Fused blocks compiled with activation_memory_budget=0.5 keep exactly what the same blocks as BatchNorm +
    add + leaky ReLU (to_batchnorm) keep compiled alike, with dx equal to eager's; compiled without a budget,
    the fused blocks keep less than those."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    fused = nn.Sequential(FusedBlock(8), FusedBlock(8)).float()
    standard = to_batchnorm(copy.deepcopy(fused))
    x = torch.randn(2, 8, 12, 12)
    eager_x = x.clone().requires_grad_()
    with quiet():
        copy.deepcopy(fused)(eager_x).sum().backward()
    with quiet():
        fused_bytes, fused_dx = _compiled_step(copy.deepcopy(fused), 0.5, x)
        standard_bytes, _ = _compiled_step(copy.deepcopy(standard), 0.5, x)
        fused_default, _ = _compiled_step(copy.deepcopy(fused), 1.0, x)
        standard_default, _ = _compiled_step(copy.deepcopy(standard), 1.0, x)
    assert fused_bytes == standard_bytes, (fused_bytes, standard_bytes)
    assert fused_default[0] < standard_default[0], (fused_default, standard_default)
    check_close(fused_dx, eager_x.grad, tol=(1e-4, 1e-5), label="dx under the budget")
    torch._dynamo.reset()


def test_standard_ops_form_keeps_what_batchnorm_keeps(backend, monkeypatch):
    """The form the layer traces as under a budget (functions._standard_ops), partitioned by the compiler's
    default (runtime-optimised) min-cut, keeps exactly the tensors of its to_batchnorm twin, by count and
    bytes. The budget is a fraction of that set, so anything extra there shifts what every budget keeps: the
    scale |w| + eps written as w * sign(w) kept one sign vector per layer, and resnet50 kept 4% more than the
    compiler alone at budget 0.5 (benchmarks/bench_residual.py models)."""
    torch._dynamo.reset()
    monkeypatch.setattr(functions, "_compiler_recomputes", torch.compiler.is_compiling)  # the form, at budget 1
    torch.manual_seed(0)
    fused = nn.Sequential(FusedBlock(8), FusedBlock(8)).float()
    standard = to_batchnorm(copy.deepcopy(fused))
    x = torch.randn(2, 8, 12, 12)
    with quiet():
        fused_kept, _ = _compiled_step(copy.deepcopy(fused), 1.0, x)
        standard_kept, _ = _compiled_step(copy.deepcopy(standard), 1.0, x)
    assert fused_kept == standard_kept, f"(bytes, tensors): standard-ops form {fused_kept}, twin {standard_kept}"
    torch._dynamo.reset()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_under_a_memory_budget_matches_eager(backend, compiler):
    """Output, dx, d(residual), parameter gradients (a zero weight included: sign(0) = +1) and running statistics
    equal eager mode; the layer is out of place there (x keeps its value)."""
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = InPlaceABN(8, activation="leaky_relu", activation_param=0.1).double()
    with torch.no_grad():
        eager.weight.uniform_(-1, 1)
        eager.weight[0] = 0.0
    compiled_layer = copy.deepcopy(eager)
    x, r = torch.randn(2, 8, 5, 4, dtype=torch.float64), torch.randn(2, 8, 5, 4, dtype=torch.float64)
    dy = torch.randn_like(x)
    results = []
    for layer in (eager, torch.compile(compiled_layer, backend=compiler, fullgraph=True)):
        leaf, r_leaf = x.clone().requires_grad_(), r.clone().requires_grad_()
        inp = leaf * 1.0
        with functorch_config.patch(activation_memory_budget=0.5), quiet():
            y = layer(inp, r_leaf)
            y.backward(dy)
        results.append((y.detach(), leaf.grad, r_leaf.grad, inp.detach()))
    (y_e, dx_e, dr_e, _), (y_c, dx_c, dr_c, inp_c) = results
    tol = (1e-11, 1e-11)
    check_close(y_c, y_e, tol=tol, label="output")
    check_close(dx_c, dx_e, tol=tol, label="dx")
    check_close(dr_c, dr_e, tol=tol, label="d(residual)")
    torch.testing.assert_close(inp_c, x, rtol=0, atol=0, msg="x was written under the budget")
    for name, p in eager.named_parameters():
        check_close(dict(compiled_layer.named_parameters())[name].grad, p.grad, tol=tol, label=f"grad {name}")
    for name, buf in eager.named_buffers():
        assert_close(dict(compiled_layer.named_buffers())[name], buf, rtol=1e-11, atol=1e-11, msg=name)
    torch._dynamo.reset()
