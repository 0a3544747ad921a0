"""Accuracy of the inversion that In-Place ABN's backward relies on (shared spec math.md, "Accuracy").

The layer keeps only its output y; backward recovers z = act^-1(y) and x_hat = (z - b) / g with
g = |w| + eps. Every rounding error of y is therefore amplified by 1/g in x_hat. This file measures,
per (backend, dtype, weight, activation) case:

- ``x_hat``: ``recover_normalized_input(y)`` vs ``reference.normalized_input(x, batch mean, batch var)``;
- ``dx``, ``dw``, ``db``: the layer's autograd vs ``reference.batch_norm_act`` autograd in float64,

each as the relative error ``rel(a, ref) = max|a - ref| / max(max|ref|, tiny)`` (max-norm error over the
max-norm of the reference, so a tensor with a few large entries is not judged elementwise on its tiny
ones; tiny = float64's smallest normal, which only matters for an all-zero reference).

Run ``python tests/test_inversion_accuracy.py`` to print the measured table the bounds below come from.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import inplace_abn
from inplace_abn import reference
from inplace_abn.functions import inplace_abn as inplace_abn_fn
from inplace_abn.functions import recover_normalized_input

EPS = 1e-5
TINY = torch.finfo(torch.float64).tiny

# Weight cases: per-channel vectors filled with this value. Bias alternates +0.3 / -0.3 per channel, so
# that with w ~ 0 (all z ~ b) one channel pair lives on the positive branch and the other on the negative
# branch of the activation, and the |b| / g amplification below is exercised.
WEIGHTS = {"zero": 0.0, "tiny": 1e-6, "negative": -0.7, "one": 1.0, "large": 100.0}
BIAS = 0.3

ACTIVATIONS = (
    [("leaky_relu", s) for s in (1e-3, 1e-2, 0.1, 0.5, 1.0)]
    + [("elu", a) for a in (0.1, 1.0, 3.0)]
    + [("identity", 0.0)]
)
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# ---------------------------------------------------------------------------------------------------
# Bound table: (dtype, weight case) -> bound on the relative error of x_hat, dx, dw and db (the worst of
# the four; see MEASURED for which one dominates). Derived from the measurements printed by
# ``python tests/test_inversion_accuracy.py`` (worst over both backends and all 9 activations, seed 0),
# set a small factor (3-10x) above the worst measured value of each row.
#
# Why the rows differ (u = unit roundoff: 6e-8 for float32, 1.1e-16 for float64):
# - "one", "negative" (g ~ 1): y is rounded once (a few u relative), the inversion adds a few u, and the
#   reductions sum N*S = 192 terms: ~1e-6 float32 / ~1e-15 float64. Measured float32 worst ~1.3e-6
#   (ELU, whose negative branch log1p(y/alpha) amplifies the rounding of y by e^{|z|} <= e^3).
# - "large" (g = 100): x_hat = (z - b) / 100 with |z| up to ~300, the rounding of z is relative, so the
#   error stays at the g ~ 1 level (the ELU rows use a skewed input that keeps z >= -3; see _make_input).
# - "zero", "tiny" (g = eps = 1e-5, or 1.1e-5): z = b + g * x_hat ~ b, so y keeps only ~u * |b| absolute
#   information about g * x_hat; dividing by g gives an x_hat error of ~u * |b| / g = u * 3e4 absolute,
#   i.e. ~1e-3 relative to max|x_hat| ~ 3 in float32 (~2e-12 float64). This is inherent in recovering
#   the input from a float output, not a bug: the spec (math.md) predicts the ~1e5 growth. It reaches dw
#   (= sum dz * x_hat) and dx (through x_hat * mean(dz * x_hat)) at the same relative level.
# - db = sum(dz) never touches x_hat: it is at the u * sqrt(N*S) level in every row.
BOUNDS = {
    ("float32", "zero"): 5e-3,  # measured worst 8.3e-4 (x_hat; dx 4.8e-4)
    ("float32", "tiny"): 5e-3,  # measured worst 8.0e-4 (x_hat)
    ("float32", "negative"): 1e-5,  # measured worst 1.3e-6 (dx, ELU alpha=0.1)
    ("float32", "one"): 1e-5,  # measured worst 1.3e-6 (dx, ELU)
    ("float32", "large"): 1e-5,  # measured worst 1.7e-6 (dx)
    ("float64", "zero"): 1e-11,  # measured worst 1.5e-12 (x_hat)
    ("float64", "tiny"): 1e-11,  # measured worst 1.5e-12 (x_hat)
    ("float64", "negative"): 1e-14,  # measured worst 2.0e-15
    ("float64", "one"): 1e-14,  # measured worst 2.2e-15
    ("float64", "large"): 1e-14,  # measured worst 2.9e-15
}


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max(max|ref|, tiny), in float64."""
    a, ref = a.double(), ref.double()
    return (a - ref).abs().max().item() / max(ref.abs().max().item(), TINY)


def _channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def _make_input(dtype: torch.dtype, weight: float, activation: str) -> torch.Tensor:
    """The layer input for one case; never saturates an ELU (z >= -3 for every element).

    A normal input has x_hat down to ~-3, so z = g * x_hat + b >= -3.3 for g <= 1. With g = 100 an ELU
    would saturate (its output is exactly -alpha below z ~ -17 in float32, and log1p(y / alpha) loses
    e^{|z|} ulps before that), so those cases use a skewed input: per channel a U(0, 1) bulk plus two
    outliers at 1e4, whose x_hat lies in [-0.025, -0.019] (z in [-2.8, -1.6]) plus two points at z ~ +4500.
    Saturation itself is tested separately (test_elu_saturation_*).
    """
    g = abs(weight) + EPS
    if activation == "elu" and 3.0 * g + BIAS > 3.3:
        n, c = 4096, 4
        x = torch.rand(c, n, dtype=torch.float64)
        for ch in range(c):
            x[ch, torch.randperm(n)[:2]] = 1e4
        x = x.reshape(c, 8, 16, 32).permute(1, 0, 2, 3).contiguous()
    else:
        x = torch.randn(4, 4, 6, 8, dtype=torch.float64) * 2.0 + 1.5
    return x.to(dtype)


def measure(dtype: torch.dtype, weight: float, activation: str, param: float) -> dict:
    """Relative errors of x_hat, dx, dw, db for one case, on the currently selected backend."""
    x = _make_input(dtype, weight, activation)
    c = x.size(1)
    w = torch.full((c,), weight, dtype=dtype)
    b = torch.tensor([BIAS if i % 2 == 0 else -BIAS for i in range(c)], dtype=dtype)
    dy = torch.randn(x.shape, dtype=dtype)

    # Layer: a non-leaf copy of x is overwritten with y.
    x_leaf = x.clone().requires_grad_()
    w_l, b_l = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = inplace_abn_fn(x_leaf.clone(), w_l, b_l, None, None, True, 0.1, EPS, activation, param)
    with torch.no_grad():
        xhat = recover_normalized_input(y.detach(), w, b, EPS, activation, param)
    y.backward(dy)

    # Float64 reference on the same (dtype-rounded) input.
    xd = x.double().requires_grad_()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    yd = reference.batch_norm_act(xd, wd, bd, None, None, True, 0.1, EPS, activation, param)
    yd.backward(dy.double())
    dims = (0, 2, 3)
    mean = x.double().mean(dims)
    var = x.double().var(dims, unbiased=False)
    xhat_ref = reference.normalized_input(x, mean, var, EPS)

    assert torch.isfinite(yd).all() and (activation != "elu" or (yd > -param * (1 - 1e-6)).all()), "input saturates"
    return {
        "x_hat": rel(xhat, xhat_ref),
        "dx": rel(x_leaf.grad, xd.grad),
        "dw": rel(w_l.grad, wd.grad),
        "db": rel(b_l.grad, bd.grad),
    }


def _act_id(act):
    return f"{act[0]}[{act[1]:g}]" if act[0] != "identity" else "identity"


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("weight_case", list(WEIGHTS))
@pytest.mark.parametrize("act", ACTIVATIONS, ids=_act_id)
def test_inversion_accuracy(backend, dtype_name, weight_case, act):
    errors = measure(DTYPES[dtype_name], WEIGHTS[weight_case], *act)
    bound = BOUNDS[(dtype_name, weight_case)]
    for name, err in errors.items():
        assert math.isfinite(err), f"{name}: non-finite error for {backend}/{dtype_name}/w={weight_case}/{act}"
        assert err <= bound, (
            f"{name}: relative error {err:.3g} exceeds bound {bound:.1g} for backend={backend} "
            f"dtype={dtype_name} weight={weight_case} activation={act} (all errors: {errors})"
        )


def test_bound_table_is_complete_and_ordered():
    """Every case has a bound; tiny-g rows are looser than g ~ 1 rows, float64 tighter than float32."""
    for d in DTYPES:
        for wc in WEIGHTS:
            assert (d, wc) in BOUNDS, f"missing bound for {(d, wc)}"
        assert BOUNDS[(d, "zero")] > BOUNDS[(d, "one")]
        assert BOUNDS[("float64", wc)] < BOUNDS[("float32", wc)]


def test_small_slope_negative_side_stays_relative(backend):
    """Slope 1e-3: the negative side is recovered by multiplying by 1000; x_hat stays u-relative there."""
    x = torch.randn(8, 3, 10, dtype=torch.float64).float() * 5.0 - 2.0
    c = x.size(1)
    w, b = torch.ones(c), torch.zeros(c)
    xc = x.clone()
    y = inplace_abn_fn(xc, w, b, None, None, True, 0.1, EPS, "leaky_relu", 1e-3)
    xhat = recover_normalized_input(y, w, b, EPS, "leaky_relu", 1e-3)
    ref = reference.normalized_input(x, x.double().mean((0, 2)), x.double().var((0, 2), unbiased=False), EPS)
    neg = ref < -1e-3
    assert neg.sum() > 20
    # Elementwise relative error on the negative side (x1000 amplification must not be absolute).
    err = ((xhat.double()[neg] - ref[neg]).abs() / ref[neg].abs()).max().item()
    assert err < 1e-5, f"negative-side x_hat relative error {err:.3g} with slope 1e-3"


# ---------------------------------------------------------------------------------------------------
# ELU saturation: outputs exactly -alpha cannot be inverted (x_hat of those elements is lost), but their
# dz = dy * (y + alpha) is exactly 0, so every gradient must stay finite, dw / db must match the
# reference, and dx must match on the non-saturated elements.


def _saturated_case(dtype, alpha):
    x = torch.randn(6, 3, 20, dtype=torch.float64)
    x[:, :, :5] -= 8.0  # a quarter of the elements far below the mean
    x = x.to(dtype)
    c = x.size(1)
    w = torch.full((c,), 50.0, dtype=dtype)
    b = torch.tensor([0.5, -0.5, 1.0], dtype=dtype)
    dy = torch.randn(x.shape, dtype=dtype)
    return x, w, b, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("alpha", [0.1, 1.0, 3.0])
def test_elu_saturation_gradients(backend, dtype, alpha):
    x, w, b, dy = _saturated_case(dtype, alpha)
    x_leaf = x.clone().requires_grad_()
    w_l, b_l = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = inplace_abn_fn(x_leaf.clone(), w_l, b_l, None, None, True, 0.1, EPS, "elu", alpha)
    saturated = y.detach() == -alpha
    assert saturated.sum() >= 50, f"the case must saturate: only {int(saturated.sum())} outputs equal -alpha"
    y.backward(dy)

    xd = x.double().requires_grad_()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    reference.batch_norm_act(xd, wd, bd, None, None, True, 0.1, EPS, "elu", alpha).backward(dy.double())

    for name, g in (("dx", x_leaf.grad), ("dw", w_l.grad), ("db", b_l.grad)):
        assert torch.isfinite(g).all(), f"{name} has non-finite entries with saturated ELU outputs"
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel(w_l.grad, wd.grad) <= tol, f"dw rel error {rel(w_l.grad, wd.grad):.3g}"
    assert rel(b_l.grad, bd.grad) <= tol, f"db rel error {rel(b_l.grad, bd.grad):.3g}"
    # On saturated elements the reference dz is ~exp(z) * alpha ~ 0 but not exactly: compare dx only on
    # the others (relative to the largest reference dx there).
    ok = ~saturated
    err = rel(x_leaf.grad[ok], xd.grad[ok])
    assert err <= tol, f"dx rel error on non-saturated elements {err:.3g}"


def test_elu_saturation_recover_is_finite(backend):
    x, w, b, _ = _saturated_case(torch.float32, 1.0)
    y = inplace_abn_fn(x.clone(), w, b, None, None, True, 0.1, EPS, "elu", 1.0)
    assert (y == -1.0).any()
    xhat = recover_normalized_input(y, w, b, EPS, "elu", 1.0)
    assert torch.isfinite(xhat).all(), "recovered x_hat of saturated outputs must be finite (clamped)"


# ---------------------------------------------------------------------------------------------------
# ReLU (slope 0) is not invertible: the layer must keep its pre-activation and give exact gradients.


@pytest.mark.parametrize("spelling", [("relu", 0.01), ("leaky_relu", 0.0)], ids=["relu", "leaky_relu-0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_relu_module_gradients(backend, spelling, dtype):
    import inplace_abn.functions as fns

    fns._warned_non_invertible = False  # the warning is once per process; re-arm it for this check
    with pytest.warns(RuntimeWarning, match="not invertible"):
        m = inplace_abn.InPlaceABN(5, activation=spelling[0], activation_param=spelling[1]).to(dtype)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.0, 0.0, -0.7, 2.0, 1e-6]))
        m.bias.copy_(torch.tensor([0.3, -0.3, 0.0, 0.5, 0.1]))
    x = torch.randn(4, 5, 7, 3, dtype=dtype)
    dy = torch.randn(x.shape, dtype=dtype)
    x_leaf = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y = m(x_leaf.clone())
    assert (y.detach() == 0).float().mean() > 0.2, "the case must exercise the dead half of the ReLU"
    y.backward(dy)

    xd = x.double().requires_grad_()
    wd = m.weight.detach().double().requires_grad_()
    bd = m.bias.detach().double().requires_grad_()
    yd = reference.batch_norm_act(xd, wd, bd, None, None, True, 0.1, m.eps, "relu", 0.0)
    yd.backward(dy.double())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.detach().double(), yd.detach(), **tol, msg="relu forward")
    torch.testing.assert_close(x_leaf.grad.double(), xd.grad, **tol, msg="relu dx")
    torch.testing.assert_close(m.weight.grad.double(), wd.grad, **tol, msg="relu dweight")
    torch.testing.assert_close(m.bias.grad.double(), bd.grad, **tol, msg="relu dbias")


def _main() -> None:  # pragma: no cover - prints the measurement table the bounds come from
    torch.set_printoptions(precision=3)
    backends = ["cpp", "python"] if inplace_abn.extension_loaded() else ["python"]
    worst = {}
    for be in backends:
        inplace_abn.set_backend(be)
        for dn, dt in DTYPES.items():
            for wc, wv in WEIGHTS.items():
                for act in ACTIVATIONS:
                    torch.manual_seed(0)
                    e = measure(dt, wv, *act)
                    print(f"{be:6s} {dn:7s} {wc:8s} {_act_id(act):18s} " + " ".join(f"{k}={v:.2e}" for k, v in e.items()))
                    for k, v in e.items():
                        key = (dn, wc)
                        if v > worst.get(key, (0.0,))[0]:
                            worst[key] = (v, k, be, _act_id(act))
    print("\nworst per row (dtype, weight): measured (quantity, backend, activation) -> bound")
    for key, (v, k, be, a) in worst.items():
        print(f"{key}: {v:.2e} ({k}, {be}, {a}) -> {BOUNDS[key]:.0e}  factor {BOUNDS[key] / v:.1f}")


if __name__ == "__main__":
    _main()
