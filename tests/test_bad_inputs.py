"""Bad inputs: every misuse raises the right exception with a message that names the argument and the fix.

``BAD_INPUTS`` is a table of rows ``(id, make_call, exception type, message fragments)``: ``make_call()``
builds fresh tensors / modules and performs the bad call; each fragment (a string or a tuple of strings)
must appear in the message. The fragments were checked against the real messages.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import inplace_abn
from inplace_abn import ABN, InPlaceABN, InPlaceABNSync
from inplace_abn.functions import inplace_abn as iabn

C = 3
EPS = 1e-5
HAS_EXT = inplace_abn.extension_loaded()


def _x(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (2, C, 4)), dtype=dtype)


def _v(n=C, **kw):
    return torch.ones(n, **kw)


def _stats():
    return torch.zeros(C), torch.ones(C)


# --- calls that need a few statements ---------------------------------------------------------------


def _activation_set_after_construction():
    m = InPlaceABN(C)
    m.activation = "swish"
    m(_x())


def _elu_alpha_set_after_construction():
    m = InPlaceABN(C, activation="elu", activation_param=1.0)
    m.activation_param = 0.0
    m(_x())


def _momentum_set_after_construction():
    m = InPlaceABN(C)
    m.momentum = 2.0
    m(_x())


def _eps_set_after_construction():
    m = InPlaceABN(C)
    m.eps = float("nan")
    m(_x())


def _output_modified_in_place():
    x = torch.randn(2, C, 4, requires_grad=True)
    y = iabn(x * 1.0, _v(), _v(), None, None)
    y.add_(1)
    y.sum().backward()


def _output_relu_inplace_after_module():
    m = torch.nn.Sequential(InPlaceABN(C), torch.nn.ReLU(inplace=True))
    x = torch.randn(2, C, 4, requires_grad=True)
    m(x * 1.0).sum().backward()


def _leaf_requiring_grad_functional():
    iabn(torch.randn(2, C, 4, requires_grad=True), _v(), _v(), None, None)


def _leaf_requiring_grad_module():
    InPlaceABN(C)(torch.randn(2, C, 4, requires_grad=True))


def _op(name):
    return getattr(torch.ops.inplace_abn, name)


_ops_only = pytest.mark.skipif(not HAS_EXT, reason="compiled extension not loaded")

# (id, make_call, exception type, fragment(s) that must all appear in the message)
BAD_INPUTS = [
    # --- functional inplace_abn: input ---
    (
        "x-1d",
        lambda: iabn(torch.randn(5), None, None, None, None),
        ValueError,
        ("x must have shape (N, C, *)", "at least 2 dimensions", "(5,)"),
    ),
    (
        "x-int64",
        lambda: iabn(torch.ones(2, C, 4, dtype=torch.int64), None, None, None, None),
        TypeError,
        ("x must be float64, float32, float16 or bfloat16", "torch.int64"),
    ),
    (
        "x-not-tensor",
        lambda: iabn([[1.0, 2.0]], None, None, None, None),
        TypeError,
        ("x must be a torch.Tensor", "list"),
    ),
    # --- functional: per-channel vectors ---
    (
        "weight-length",
        lambda: iabn(_x(), _v(4), _v(), None, None),
        ValueError,
        ("weight must have shape (3,)", "got (4,)"),
    ),
    ("bias-length", lambda: iabn(_x(), _v(), _v(2), None, None), ValueError, ("bias must have shape (3,)", "got (2,)")),
    (
        "running_mean-length",
        lambda: iabn(_x(), _v(), _v(), torch.zeros(4), torch.ones(C)),
        ValueError,
        ("running_mean must have shape (3,)", "got (4,)"),
    ),
    (
        "running_var-device-meta",
        lambda: iabn(_x(), _v(), _v(), torch.zeros(C), torch.ones(C, device="meta")),
        ValueError,
        ("running_var is on meta", "x is on cpu"),
    ),
    (
        "weight-device-meta",
        lambda: iabn(_x(), _v(device="meta"), _v(), None, None),
        ValueError,
        ("weight is on meta", "x is on cpu"),
    ),
    (
        "weight-float64-x-float32",
        lambda: iabn(_x(), _v(dtype=torch.float64), _v(), None, None),
        TypeError,
        ("weight has dtype torch.float64", "x has dtype torch.float32"),
    ),
    (
        "bias-not-tensor",
        lambda: iabn(_x(), _v(), [0.0] * C, None, None),
        TypeError,
        ("bias must be a torch.Tensor or None", "list"),
    ),
    (
        "running_mean-without-running_var",
        lambda: iabn(_x(), _v(), _v(), torch.zeros(C), None),
        ValueError,
        ("running_mean and running_var must be both tensors or both None",),
    ),
    # --- functional: scalars ---
    ("eps-zero", lambda: iabn(_x(), _v(), _v(), None, None, True, 0.1, 0.0), ValueError, ("eps must be > 0", "0.0")),
    (
        "eps-negative",
        lambda: iabn(_x(), _v(), _v(), None, None, True, 0.1, -1e-5),
        ValueError,
        ("eps must be > 0", "-1e-05"),
    ),
    (
        "eps-inf",
        lambda: iabn(_x(), _v(), _v(), None, None, True, 0.1, float("inf")),
        ValueError,
        ("eps must be > 0 and finite", "inf"),
    ),
    (
        "eps-nan",
        lambda: iabn(_x(), _v(), _v(), None, None, True, 0.1, float("nan")),
        ValueError,
        ("eps must be > 0 and finite", "nan"),
    ),
    (
        "eps-none",
        lambda: iabn(_x(), _v(), _v(), None, None, True, 0.1, None),
        ValueError,
        ("eps must be > 0 and finite", "None"),
    ),
    (
        "momentum-above-1-functional",
        lambda: iabn(_x(), _v(), _v(), *_stats(), True, 1.5),
        ValueError,
        ("momentum must be a number in [0, 1]", "1.5"),
    ),
    (
        "momentum-negative-functional",
        lambda: iabn(_x(), _v(), _v(), *_stats(), True, -0.1),
        ValueError,
        ("momentum must be a number in [0, 1]", "-0.1"),
    ),
    (
        "momentum-none-functional",
        lambda: iabn(_x(), _v(), _v(), *_stats(), True, None),
        ValueError,
        ("momentum must be a number in [0, 1]", "None", "InPlaceABN(C, momentum=None)"),
    ),
    (
        "momentum-nan-functional",
        lambda: iabn(_x(), _v(), _v(), *_stats(), True, float("nan")),
        ValueError,
        ("momentum must be a number in [0, 1]", "nan"),
    ),
    (
        "zero-channels",
        lambda: iabn(torch.randn(2, 0, 4), None, None, None, None),
        ValueError,
        ("x must have at least one channel", "(2, 0, 4)"),
    ),
    (
        "leaky-slope-reciprocal-overflows-float32",
        lambda: iabn(_x(), _v(), _v(), None, None, True, 0.1, EPS, "leaky_relu", 1e-40),
        ValueError,
        ("leaky_relu negative slope) 1e-40 is too small for torch.float32", "overflows"),
    ),
    (
        "leaky-slope-rounds-to-0-float32",
        lambda: iabn(_x(), _v(), _v(), None, None, True, 0.1, EPS, "leaky_relu", 1e-46),
        ValueError,
        ("leaky_relu negative slope) 1e-46 is too small for torch.float32",),
    ),
    (
        "elu-alpha-reciprocal-overflows-float32",
        lambda: iabn(_x(), _v(), _v(), None, None, True, 0.1, EPS, "elu", 1e-40),
        ValueError,
        ("ELU alpha) 1e-40 is too small for torch.float32",),
    ),
    (
        "elu-alpha-too-small-bfloat16-module",
        lambda: InPlaceABN(C, activation="elu", activation_param=1e-39)(_x(dtype=torch.bfloat16)),
        ValueError,
        ("ELU alpha) 1e-39 is too small for torch.float32",),
    ),
    (
        "momentum-set-after-construction",
        _momentum_set_after_construction,
        ValueError,
        ("momentum must be a number in [0, 1]", "2.0"),
    ),
    ("eps-set-after-construction", _eps_set_after_construction, ValueError, ("eps must be > 0 and finite", "nan")),
    # --- overlapping memory: the layer writes into x (and the running statistics) ---
    (
        "x-overlapping-unfold",
        lambda: iabn(torch.randn(2, C, 10).unfold(2, 4, 2), _v(), _v(), None, None),
        ValueError,
        ("x has internally overlapping memory", "unfold", "pass x.contiguous()"),
    ),
    (
        "x-overlapping-expand",
        lambda: iabn(torch.randn(2, C, 1).expand(2, C, 5), _v(), _v(), None, None),
        ValueError,
        ("x has internally overlapping memory", "strides (3, 1, 0)"),
    ),
    (
        "x-overlapping-as-strided",
        lambda: iabn(torch.randn(40).as_strided((2, C, 4), (3, 1, 1)), _v(), _v(), None, None),
        ValueError,
        ("x has internally overlapping memory",),
    ),
    (
        "x-overlapping-module",
        lambda: InPlaceABN(C)(torch.randn(2, C, 10).unfold(2, 4, 2)),
        ValueError,
        ("x has internally overlapping memory",),
    ),
    (
        "running-mean-overlapping",
        lambda: iabn(_x(), _v(), _v(), torch.zeros(1).expand(C), torch.ones(C)),
        ValueError,
        ("running_mean has internally overlapping memory", "running_mean.contiguous()"),
    ),
    (
        "running-var-overlapping",
        lambda: iabn(_x(), _v(), _v(), torch.zeros(C), torch.ones(1).expand(C)),
        ValueError,
        ("running_var has internally overlapping memory",),
    ),
    # --- torch.func transforms: the layer named, and the way out ---
    (
        "torch-func-grad",
        lambda: torch.func.grad(lambda t: InPlaceABN(C)(t * 1.0).sum())(_x()),
        RuntimeError,
        ("inplace_abn", "cannot run under torch.func transforms", "to_batchnorm"),
    ),
    (
        "torch-func-vmap",
        lambda: torch.func.vmap(lambda t: iabn(t * 1.0, _v(), _v(), None, None))(_x(4, 2, C, 3)),
        RuntimeError,
        ("inplace_abn", "cannot run under torch.func transforms"),
    ),
    (
        "eval-without-running-stats",
        lambda: iabn(_x(), _v(), _v(), None, None, False),
        ValueError,
        ("running_mean and running_var are required when training=False",),
    ),
    (
        "functional-unknown-activation",
        lambda: iabn(_x(), _v(), _v(), None, None, True, 0.1, EPS, "swish"),
        ValueError,
        ("activation must be one of", "'swish'"),
    ),
    (
        "functional-negative-slope",
        lambda: iabn(_x(), _v(), _v(), None, None, True, 0.1, EPS, "leaky_relu", -0.5),
        ValueError,
        ("leaky_relu negative slope) must be >= 0", "-0.5"),
    ),
    (
        "one-value-per-channel-functional",
        lambda: iabn(torch.randn(1, C), _v(), _v(), None, None),
        ValueError,
        ("Expected more than 1 value per channel", "[1, 3]"),
    ),
    # --- construction (validated at construction, not at the first forward) ---
    (
        "ABN-unknown-activation",
        lambda: ABN(C, activation="swish"),
        ValueError,
        ("activation must be one of", "'swish'"),
    ),
    (
        "InPlaceABN-unknown-activation",
        lambda: InPlaceABN(C, activation="swish"),
        ValueError,
        ("activation must be one of", "'swish'"),
    ),
    (
        "InPlaceABNSync-unknown-activation",
        lambda: InPlaceABNSync(C, activation="gelu"),
        ValueError,
        ("activation must be one of", "'gelu'"),
    ),
    (
        "InPlaceABN-negative-slope",
        lambda: InPlaceABN(C, activation="leaky_relu", activation_param=-0.1),
        ValueError,
        ("negative slope) must be >= 0", "-0.1"),
    ),
    (
        "InPlaceABN-elu-alpha-zero",
        lambda: InPlaceABN(C, activation="elu", activation_param=0.0),
        ValueError,
        ("ELU alpha) must be > 0", "0.0"),
    ),
    (
        "InPlaceABN-elu-alpha-negative",
        lambda: InPlaceABN(C, activation="elu", activation_param=-1.0),
        ValueError,
        ("ELU alpha) must be > 0", "-1.0"),
    ),
    (
        "ABN-elu-alpha-negative",
        lambda: ABN(C, activation="elu", activation_param=-1.0),
        ValueError,
        ("ELU alpha) must be > 0", "-1.0"),
    ),
    (
        "activation_param-not-a-number",
        lambda: InPlaceABN(C, activation="elu", activation_param="big"),
        ValueError,
        ("activation_param must be a number", "'big'"),
    ),
    ("num_features-zero", lambda: InPlaceABN(0), ValueError, ("num_features must be a positive int", "0")),
    ("num_features-negative", lambda: ABN(-3), ValueError, ("num_features must be a positive int", "-3")),
    ("momentum-above-1", lambda: InPlaceABN(C, momentum=1.5), ValueError, ("momentum must be in [0, 1]", "1.5")),
    ("momentum-negative", lambda: InPlaceABN(C, momentum=-0.1), ValueError, ("momentum must be in [0, 1]", "-0.1")),
    ("module-eps-zero", lambda: InPlaceABN(C, eps=0.0), ValueError, ("eps must be > 0",)),
    # --- modules at forward ---
    (
        "activation-bad-after-construction",
        _activation_set_after_construction,
        ValueError,
        ("activation must be one of", "'swish'"),
    ),
    ("elu-alpha-zero-after-construction", _elu_alpha_set_after_construction, ValueError, ("ELU alpha) must be > 0",)),
    (
        "InPlaceABN-wrong-channels",
        lambda: InPlaceABN(C)(torch.randn(2, C + 1, 4)),
        ValueError,
        ("InPlaceABN(3) got an input with 4 channels", "num_features"),
    ),
    (
        "ABN-wrong-channels",
        lambda: ABN(C)(torch.randn(2, C + 1, 4)),
        ValueError,
        ("ABN(3) got an input with 4 channels",),
    ),
    (
        "InPlaceABN-1d-input",
        lambda: InPlaceABN(C)(torch.randn(C)),
        ValueError,
        ("InPlaceABN expects an input of shape (N, C, *)", "(3,)"),
    ),
    (
        "InPlaceABN-one-value-per-channel",
        lambda: InPlaceABN(C)(torch.randn(1, C)),
        ValueError,
        ("Expected more than 1 value per channel",),
    ),
    (
        "ABN-one-value-per-channel",
        lambda: ABN(C)(torch.randn(1, C)),
        ValueError,
        ("Expected more than 1 value per channel",),
    ),
    # --- autograd misuse ---
    ("output-modified-in-place", _output_modified_in_place, RuntimeError, ("modified by an inplace operation",)),
    (
        "ReLU-inplace-after-layer",
        _output_relu_inplace_after_module,
        RuntimeError,
        ("modified by an inplace operation",),
    ),
    (
        "leaf-requires-grad-functional",
        _leaf_requiring_grad_functional,
        RuntimeError,
        ("a leaf Variable that requires grad", "in-place operation"),
    ),
    (
        "leaf-requires-grad-module",
        _leaf_requiring_grad_module,
        RuntimeError,
        ("a leaf Variable that requires grad", "in-place operation"),
    ),
]

_X = lambda: torch.randn(2, C, 4)  # noqa: E731
_MV = lambda: (torch.zeros(C), torch.ones(C))  # noqa: E731

OP_BAD_INPUTS = [
    (
        "op-forward_-weight-length",
        lambda: _op("forward_")(_X(), *_MV(), _v(4), _v(), EPS, "leaky_relu", 0.01),
        RuntimeError,
        ("weight must be a 1-D tensor with one entry per channel (3)", "[4]"),
    ),
    (
        "op-forward_-mean-length",
        lambda: _op("forward_")(_X(), torch.zeros(4), torch.ones(C), _v(), _v(), EPS, "leaky_relu", 0.01),
        RuntimeError,
        ("mean must be a 1-D tensor with one entry per channel (3)", "[4]"),
    ),
    (
        "op-forward_-x-1d",
        lambda: _op("forward_")(torch.randn(5), *_MV(), None, None, EPS, "leaky_relu", 0.01),
        RuntimeError,
        ("x must have shape (N, C, *)", "[5]"),
    ),
    (
        "op-forward_-unknown-activation",
        lambda: _op("forward_")(_X(), *_MV(), _v(), _v(), EPS, "swish", 0.01),
        RuntimeError,
        ("activation must be one of", "'swish'"),
    ),
    # a slope / alpha whose reciprocal overflows (or that rounds to 0) in the compute dtype: float32 here
    (
        "op-forward_-leaky-slope-1e-40",
        lambda: _op("forward_")(_X(), *_MV(), _v(), _v(), EPS, "leaky_relu", 1e-40),
        RuntimeError,
        ("activation_param 1e-40 is too small for float32", "overflows"),
    ),
    (
        "op-forward_-elu-alpha-1e-46",
        lambda: _op("forward_")(_X(), *_MV(), _v(), _v(), EPS, "elu", 1e-46),
        RuntimeError,
        ("activation_param 1e-46 is too small for float32",),
    ),
    (
        "op-invert-leaky-slope-1e-40",
        lambda: _op("invert")(_X(), _v(), _v(), EPS, "leaky_relu", 1e-40, None),
        RuntimeError,
        ("activation_param 1e-40 is too small for float32",),
    ),
    (
        "op-forward_-leaky-slope-0",
        lambda: _op("forward_")(_X(), *_MV(), _v(), _v(), EPS, "leaky_relu", 0.0),
        RuntimeError,
        ("activation_param (negative slope) must be > 0", "got 0"),
    ),
    (
        "op-forward_-elu-alpha-0",
        lambda: _op("forward_")(_X(), *_MV(), _v(), _v(), EPS, "elu", 0.0),
        RuntimeError,
        ("activation_param (ELU alpha) must be > 0",),
    ),
    # eps = 0 is rejected by the op itself (check_eps in src/inplace_abn.h): gamma = |w| + eps would be 0
    # for w = 0 and the backward / invert of that output would divide by 0.
    (
        "op-forward_-eps-zero",
        lambda: _op("forward_")(_X(), *_MV(), _v(), _v(), 0.0, "leaky_relu", 0.01),
        RuntimeError,
        ("eps must be > 0",),
    ),
    (
        "op-statistics-x-1d",
        lambda: _op("statistics")(torch.randn(5)),
        RuntimeError,
        ("x must have shape (N, C, *)", "[5]"),
    ),
    (
        "op-statistics-x-int",
        lambda: _op("statistics")(torch.ones(2, C, 4, dtype=torch.int32)),
        RuntimeError,
        ("x must be float64, float32, float16 or bfloat16", "Int"),
    ),
    (
        "op-backward-weight-length",
        lambda: _op("backward")(
            _X(), _X(), torch.ones(C), _v(4), _v(), torch.zeros(C), torch.zeros(C), EPS, "leaky_relu", 0.01
        ),
        RuntimeError,
        ("weight must be a 1-D tensor with one entry per channel (3)", "[4]"),
    ),
    (
        "op-backward-y-1d",
        lambda: _op("backward")(
            torch.randn(5), torch.randn(5), torch.ones(C), None, None, None, None, EPS, "leaky_relu", 0.01
        ),
        RuntimeError,
        ("y must have shape (N, C, *)", "[5]"),
    ),
    (
        "op-backward-unknown-activation",
        lambda: _op("backward")(_X(), _X(), torch.ones(C), _v(), _v(), None, None, EPS, "swish", 0.01),
        RuntimeError,
        ("activation must be one of", "'swish'"),
    ),
    (
        "op-backward-leaky-slope-0",
        lambda: _op("backward")(_X(), _X(), torch.ones(C), _v(), _v(), None, None, EPS, "leaky_relu", 0.0),
        RuntimeError,
        ("activation_param (negative slope) must be > 0",),
    ),
    (
        "op-backward-dy-shape",
        lambda: _op("backward")(
            _X(), torch.randn(2, C, 5), torch.ones(C), _v(), _v(), None, None, EPS, "leaky_relu", 0.01
        ),
        RuntimeError,
        ("y and dy must have the same shape", "[2, 3, 5]"),
    ),
    (
        "op-backward-mean_dz-without-mean_dz_xhat",
        lambda: _op("backward")(_X(), _X(), torch.ones(C), _v(), _v(), torch.zeros(C), None, EPS, "leaky_relu", 0.01),
        RuntimeError,
        ("mean_dz and mean_dz_xhat must be given together",),
    ),
    # backward / backward_reduce / invert validate eps like forward_ (check_eps): eps = -1 with var = 1
    # would give rstd = 1 / sqrt(0) = inf and a non-finite dx.
    (
        "op-backward-eps-negative",
        lambda: _op("backward")(_X(), _X(), torch.ones(C), _v(), _v(), None, None, -1.0, "leaky_relu", 0.01),
        RuntimeError,
        ("eps must be > 0",),
    ),
    (
        "op-backward_reduce-weight-length",
        lambda: _op("backward_reduce")(_X(), _X(), _v(4), _v(), EPS, "leaky_relu", 0.01),
        RuntimeError,
        ("weight must be a 1-D tensor with one entry per channel (3)", "[4]"),
    ),
    (
        "op-backward_reduce-unknown-activation",
        lambda: _op("backward_reduce")(_X(), _X(), _v(), _v(), EPS, "swish", 0.01),
        RuntimeError,
        ("activation must be one of", "'swish'"),
    ),
    (
        "op-backward_reduce-leaky-slope-0",
        lambda: _op("backward_reduce")(_X(), _X(), _v(), _v(), EPS, "leaky_relu", 0.0),
        RuntimeError,
        ("activation_param (negative slope) must be > 0",),
    ),
    (
        "op-invert-bias-length",
        lambda: _op("invert")(_X(), _v(), _v(4), EPS, "leaky_relu", 0.01),
        RuntimeError,
        ("bias must be a 1-D tensor with one entry per channel (3)", "[4]"),
    ),
]

ROWS = [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUTS]
OP_ROWS = [pytest.param(*row[1:], id=row[0], marks=_ops_only) for row in OP_BAD_INPUTS]


def _fragments(f):
    return (f,) if isinstance(f, str) else tuple(f)


def test_table_is_well_formed():
    ids = [r[0] for r in BAD_INPUTS + OP_BAD_INPUTS]
    assert len(ids) == len(set(ids)), "duplicate row ids"
    for rid, call, exc, frags in BAD_INPUTS + OP_BAD_INPUTS:
        assert callable(call) and issubclass(exc, Exception) and _fragments(frags), rid


def _check(make_call, exc_type, fragments):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # e.g. the sync layer's "not initialised" warning
        with pytest.raises(exc_type) as info:
            make_call()
    message = str(info.value)
    for fragment in _fragments(fragments):
        assert fragment in message, f"expected {fragment!r} in the {exc_type.__name__} message: {message!r}"


@pytest.mark.parametrize("make_call, exc_type, fragments", ROWS)
def test_bad_input(backend, make_call, exc_type, fragments):
    """Python-layer rows, on both backends (the autograd rows run the backend's kernels)."""
    _check(make_call, exc_type, fragments)


@pytest.mark.parametrize("make_call, exc_type, fragments", OP_ROWS)
def test_bad_op_input(make_call, exc_type, fragments):
    """Direct torch.ops.inplace_abn calls (backend-independent: they always run the compiled kernels)."""
    _check(make_call, exc_type, fragments)


# --- construction time, not first forward -----------------------------------------------------------

BAD_ACTIVATIONS = [
    ("swish", 0.01),
    ("LeakyReLU", 0.01),
    (None, 0.01),
    ("leaky_relu", -0.01),
    ("elu", 0.0),
    ("elu", -1.0),
    ("elu", float("nan")),
]


@pytest.mark.parametrize("cls", [ABN, InPlaceABN, InPlaceABNSync], ids=lambda c: c.__name__)
@pytest.mark.parametrize("activation, param", BAD_ACTIVATIONS, ids=[f"{a}-{p}" for a, p in BAD_ACTIVATIONS])
def test_bad_activation_raises_at_construction(cls, activation, param):
    constructed = []

    def build():
        constructed.append(cls(C, activation=activation, activation_param=param))

    with pytest.raises(ValueError, match="activation"):
        build()
    assert not constructed, "the constructor must raise, not return a module that fails at the first forward"


@pytest.mark.parametrize("cls", [ABN, InPlaceABN, InPlaceABNSync], ids=lambda c: c.__name__)
def test_good_activations_construct(cls):
    for activation, param in [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0), ("none", 0.0)]:
        m = cls(C, activation=activation, activation_param=param)
        assert m.activation == activation


# --- a rejected call must not corrupt state -----------------------------------------------------------


@pytest.mark.parametrize("via", ["functional", "module"])
def test_leaf_error_leaves_input_and_running_stats_untouched(backend, via):
    """PyTorch's own in-place ops check the leaf before writing (x.relu_() leaves x intact). The layer must
    not overwrite a user's leaf tensor (or update running statistics) on a call it then rejects."""
    x = torch.randn(2, C, 4, requires_grad=True)
    before = x.detach().clone()
    m = InPlaceABN(C)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        if via == "module":
            m(x)
        else:
            iabn(x, m.weight, m.bias, m.running_mean, m.running_var)
    assert torch.equal(x.detach(), before), "the rejected leaf tensor was overwritten with the layer output"
    assert torch.equal(m.running_mean, torch.zeros(C)), "running_mean was updated by a rejected call"
    assert torch.equal(m.running_var, torch.ones(C)), "running_var was updated by a rejected call"


def test_bad_activation_after_construction_leaves_module_state(backend):
    """ABN validates the activation before touching num_batches_tracked; InPlaceABN must too."""
    for cls in (ABN, InPlaceABN):
        m = cls(C)
        m.activation = "swish"
        with pytest.raises(ValueError, match="swish"):
            m(_x())
        assert int(m.num_batches_tracked) == 0, f"{cls.__name__}: num_batches_tracked advanced by a rejected call"


def test_use_backend_restores_the_previous_backend_even_on_error(backend):
    """``inplace_abn.use_backend`` selects a backend for a block and restores the previous one afterwards,
    also when the block raises; an unknown name is refused before anything changes."""
    with inplace_abn.use_backend("python") as name:
        assert name == "python" and inplace_abn.get_backend() == "python"
    assert inplace_abn.get_backend() == backend
    with pytest.raises(KeyError):
        with inplace_abn.use_backend("python"):
            raise KeyError("inside")
    assert inplace_abn.get_backend() == backend
    with pytest.raises(ValueError, match="backend must be one of"):
        with inplace_abn.use_backend("fortran"):
            pass
    assert inplace_abn.get_backend() == backend


def test_bad_momentum_after_construction_leaves_every_state_alone(backend):
    """A momentum set out of range after construction is refused before anything is written: the input,
    the running statistics and num_batches_tracked are unchanged (both backends)."""
    m = InPlaceABN(C)
    with torch.no_grad():
        m.running_mean.uniform_()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.momentum = 1.5
    x = _x()
    x0 = x.clone()
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\], got 1.5"):
        m(x)
    torch.testing.assert_close(x, x0, rtol=0, atol=0)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def test_tiny_slope_is_accepted_where_its_reciprocal_fits(backend):
    """The same slope that float32 refuses (1 / 1e-40 overflows) is exact in float64: output and every
    gradient match the float64 reference, all finite."""
    torch.manual_seed(0)
    base = torch.randn(4, C, 5, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.3, 0.0], dtype=torch.float64, requires_grad=True)
    y = iabn(base * 1.0, w, b, None, None, True, 0.1, EPS, "leaky_relu", 1e-40)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (base, w, b), dy)
    ref = inplace_abn.reference.batch_norm_act(base, w, b, None, None, True, 0.1, EPS, "leaky_relu", 1e-40)
    ref_grads = torch.autograd.grad(ref, (base, w, b), dy)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for name, g, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-8, msg=name)


@pytest.mark.parametrize("change", ["momentum", "eps", "overlapping-x"])
def test_refused_call_leaves_every_state_alone(backend, change):
    """momentum / eps changed after construction and an overlapping input are refused before anything is
    written: the input's storage, the running statistics and num_batches_tracked are unchanged."""
    m = InPlaceABN(C)
    with torch.no_grad():
        m.running_mean.uniform_()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    base = torch.randn(2, C, 10)
    x = base[..., :6]
    if change == "momentum":
        m.momentum = -0.5
    elif change == "eps":
        m.eps = 0.0
    else:
        x = base.unfold(2, 4, 2)
    base0 = base.clone()
    with pytest.raises(
        ValueError, match={"momentum": "momentum", "eps": "eps", "overlapping-x": "overlapping"}[change]
    ):
        m(x)
    torch.testing.assert_close(base, base0, rtol=0, atol=0)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def _views():
    """Non-overlapping strided inputs, which must be accepted (the last one has strides that need the exact
    enumeration of offsets: channel stride 2 and length stride 3 interleave without colliding)."""
    return {
        "stepped": torch.randn(2, C, 12, dtype=torch.float64)[..., ::3],
        "unfold-no-overlap": torch.randn(2, C, 8, dtype=torch.float64).unfold(2, 2, 2),
        "as-strided-interleaved": torch.randn(16, dtype=torch.float64).as_strided((2, C, 2), (8, 2, 3)),
    }


@pytest.mark.parametrize("view", ["stepped", "unfold-no-overlap", "as-strided-interleaved"])
def test_non_overlapping_strided_input_matches_its_contiguous_copy(backend, view):
    x = _views()[view]
    from inplace_abn.validation import has_internal_overlap

    assert not has_internal_overlap(x)
    xc = x.contiguous()
    w, b = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64), torch.tensor([0.1, 0.0, -0.2], dtype=torch.float64)
    y = iabn(x, w, b, None, None, True, 0.1, EPS, "leaky_relu", 0.1)
    yc = iabn(xc, w, b, None, None, True, 0.1, EPS, "leaky_relu", 0.1)
    torch.testing.assert_close(y, yc)
