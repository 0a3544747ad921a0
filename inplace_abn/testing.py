"""Tolerances and the comparison helper shared by the test suite and ``python -m inplace_abn.selftest``.

One table, :data:`TOLERANCES`, maps a dtype to the ``(atol, rtol)`` a result of the in-place layer in
that dtype must meet against a float64 computation of the same inputs (or the other backend's result,
as in the selftest). The ``atol`` is *relative to the magnitude of the compared tensor*: it is multiplied
by ``max(min_scale, max|expected|)`` (see :func:`magnitude_scale`), because the per-channel sums (dweight,
dbias) grow with N * H * W. Cases whose error is larger (or smaller) for a known reason have their own
named entries below, each with that reason.

:func:`check_close` is the assertion (a thin wrapper over :func:`torch.testing.assert_close`);
:func:`scaled_error` is the same comparison as a measurement, for reports that must not raise.

Example:
    >>> from inplace_abn.testing import check_close
    >>> check_close(y, y_ref, torch.float32, "output")            # TOLERANCES[torch.float32]
    >>> check_close(dw, dw_ref, torch.float16, "dweight", tol=ELU_HALF_TOL, min_scale=count**0.5)
"""

from __future__ import annotations

import torch

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "ZERO_WEIGHT_F64_TOL",
    "ELU_HALF_TOL",
    "COMPILED_TOLERANCES",
    "HALF_MODEL_TOLERANCES",
    "HALF_LAYER_TOLERANCES",
    "HALF_MODEL_GRAD_NORM_RTOL",
    "STATS_RTOL",
    "LAYOUT_TOLERANCES",
    "tolerance",
    "magnitude_scale",
    "scaled_error",
    "check_close",
]

Tolerance = tuple[float, float]
"""``(atol, rtol)``; the atol is multiplied by :func:`magnitude_scale` of the expected tensor."""

# dtype -> (atol, rtol): the layer (either backend, any device) vs float64 on the same inputs.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    # Reason: float64 kernels vs the float64 reference differ only in summation order and in the inversion
    # of the activation (division by g = |w| + eps, log1p for ELU): a few ulp times small factors.
    torch.float64: (1e-10, 1e-10),
    # Reason: float32 unit roundoff is 6e-8; the per-channel sums over up to ~5e3 elements and the
    # cancellation in dx = g * rstd * (dz - mean(dz) - x_hat * mean(dz * x_hat)) cost up to ~2 digits.
    torch.float32: (2e-5, 2e-5),
    # Reason: float16 has an 11-bit significand (u = 4.9e-4); y is rounded to fp16 and x_hat is recovered
    # from it, so dx / dweight inherit errors of a few u; statistics are accumulated in float32.
    torch.float16: (1e-2, 1e-2),
    # Reason: bfloat16 has an 8-bit significand (u = 3.9e-3), 8x coarser than fp16; recovering x_hat from
    # the rounded output and rounding dx back to bf16 give errors of a few u.
    torch.bfloat16: (4e-2, 4e-2),
}

# Reason: float64 with a zero weight: x_hat is recovered by dividing by g = eps = 1e-5, which amplifies the
# rounding of y (~1e-16 relative to the bias) by 1e5 (docs/math.md, "Accuracy").
ZERO_WEIGHT_F64_TOL: Tolerance = (1e-9, 1e-9)

# Reason: ELU in half precision (training): the backward recovers z = log1p(y / alpha) from the rounded y;
# near saturation (z ~ -5, y ~ -0.996 alpha) 1 + y / alpha keeps only a few significant bits, so the
# rounding of y is amplified by ~e^-z (~150) in x_hat (inherent in inverting ELU, docs/math.md "Accuracy").
ELU_HALF_TOL: Tolerance = (1.5e-1, 1e-1)

# dtype -> (atol, rtol): a torch.compile'd model vs the same model run eagerly, over 3 SGD steps.
COMPILED_TOLERANCES: dict[torch.dtype, Tolerance] = {
    # Reason: compiled and eager run the same custom kernels (or, for "python", the same ATen ops);
    # inductor only regenerates the pointwise glue (running-stat lerp, sign(w) * sum, layout copies) and
    # may contract a*b+c into an FMA: a few ulp, amplified by the 3-step SGD loop. Tighter than
    # TOLERANCES[float64]: no inversion against an independent reference is involved.
    torch.float64: (1e-11, 1e-11),
    # Reason: inductor's fused pointwise code (vectorised, FMA) rounds differently from ATen's, and the conv
    # backward may pick another algorithm for the channels_last layout inductor chooses on the CPU; the
    # per-channel sums over N*H*W elements then differ by ~1e-6 relative, on top of the 3 SGD steps.
    torch.float32: (5e-5, 5e-5),
}

# dtype -> (atol, rtol): a whole Conv2d -> InPlaceABN model in a half type (autocast, or converted with
# .half() / .bfloat16()) vs the same model in float32.
HALF_MODEL_TOLERANCES: dict[torch.dtype, Tolerance] = {
    # Reason: fp16 everywhere or under autocast: the conv and the layer each round to fp16 (u = 4.9e-4);
    # statistics and per-channel sums accumulate in float32. Same figure as TOLERANCES[float16].
    torch.float16: (1e-2, 1e-2),
    # Reason: the conv runs in bf16 (u = 3.9e-3, sums over 27-72 products), the layer normalises that
    # rounded input and rounds y to bf16: after two such stages errors are ~10 u, looser than
    # TOLERANCES[bfloat16], which covers the layer alone.
    torch.bfloat16: (6e-2, 6e-2),
}

# dtype -> (atol, rtol): the half layer vs the float32 layer on the same (half-valued) input, with the
# |w| >= 0.3 weights of tests/test_mixed_precision.py.
HALF_LAYER_TOLERANCES: dict[torch.dtype, Tolerance] = {
    # Reason: only the rounding of y and dx to fp16 differs (2 u, u = 4.9e-4), plus the inversion of the
    # rounded y in backward (x_hat = (z - b) / g amplifies by |b| / g, <= ~3 with these weights).
    torch.float16: (4e-3, 4e-3),
    # Reason: as fp16 with u = 3.9e-3.
    torch.bfloat16: (3e-2, 3e-2),
}

# dtype -> rtol of the relative L2 norm error of dx and of the parameter grads of a whole half model vs
# float32.
HALF_MODEL_GRAD_NORM_RTOL: dict[torch.dtype, float] = {
    # Reason: fp16 pre-activations within a rounding error of 0 rarely change leaky_relu branch; the
    # per-channel grads are sums with cancellation, so the error is judged on the norm over all channels.
    torch.float16: 1e-2,
    # Reason: in bf16 ~1% of the pre-activations take the other leaky_relu branch (slope 1 vs 0.01) in one
    # of the two models, so those dx elements differ entirely (inherent to comparing two precisions
    # through a kink, the same on both backends): only a norm comparison is meaningful.
    torch.bfloat16: 1e-1,
}

# Reason: the statistics are accumulated in float32 whatever the input dtype: the running mean after one
# step from zero is momentum * mean(x) and must match the float64 mean of the (exactly representable) half
# input to float32 accuracy (computed in bf16 it would be off by ~1e-3 relative).
STATS_RTOL: float = 1e-5

# dtype -> (atol, rtol): the layer on a channels_last input vs the same layer on a contiguous copy.
LAYOUT_TOLERANCES: dict[torch.dtype, Tolerance] = {
    # Reason: the same arithmetic in another element order: only the summation order of the statistics.
    torch.float32: (1e-6, 1e-6),
    # Reason: as float32, then y rounded to bf16 (u = 3.9e-3) after possibly different float32 statistics.
    torch.bfloat16: (1e-2, 1e-2),
}


def tolerance(dtype: torch.dtype, activation: str | None = None, training: bool = True) -> Tolerance:
    """The ``(atol, rtol)`` of a layer result in ``dtype`` against float64 (or the other backend).

    Args:
        dtype: The dtype of the layer's input and output.
        activation: The layer's activation; ``"elu"`` in a half type while training gets
            :data:`ELU_HALF_TOL`.
        training: Whether the result comes from a training step (the ELU inversion happens in backward).

    Returns:
        ``(atol, rtol)`` from :data:`TOLERANCES`, or :data:`ELU_HALF_TOL`.

    Raises:
        KeyError: ``dtype`` has no entry in :data:`TOLERANCES`.
    """
    if activation == "elu" and training and dtype in (torch.float16, torch.bfloat16):
        return ELU_HALF_TOL
    return TOLERANCES[dtype]


def magnitude_scale(expected: torch.Tensor, min_scale: float = 1.0) -> float:
    """The factor the atol is multiplied by: ``max(min_scale, max |finite expected|)``.

    Args:
        expected: The reference tensor.
        min_scale: Lower bound; ``sqrt(count)`` for a per-channel sum of ``count`` O(1) terms, so a sum that
            cancels to ~0 is judged against the size of its terms.

    Returns:
        The scale, ``min_scale`` for an empty or all non-finite ``expected``.
    """
    finite = expected[torch.isfinite(expected)]
    if finite.numel() == 0:
        return float(min_scale)
    return max(float(min_scale), finite.abs().max().item())


def _prepare(
    actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    if mask is not None:
        mask = mask.to("cpu")
        actual, expected = actual[mask], expected[mask]
    return actual, expected


def scaled_error(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tol: Tolerance,
    min_scale: float = 1.0,
    mask: torch.Tensor | None = None,
) -> tuple[float, bool]:
    """The comparison of :func:`check_close` as a measurement (never raises on a mismatch).

    Args:
        actual: The result under test (any device and dtype; compared in float64 on the CPU).
        expected: The reference, same shape as ``actual``.
        tol: ``(atol, rtol)``; the atol is multiplied by :func:`magnitude_scale`.
        min_scale: See :func:`magnitude_scale`.
        mask: Boolean tensor selecting the compared elements (e.g. leaving out saturated ELU outputs).

    Returns:
        ``(max |actual - expected| / scale, all elements close)``, with NaN in both at the same place
        counted as equal; ``(inf, False)`` for different shapes, ``(0.0, True)`` when nothing is compared.
    """
    if actual.shape != expected.shape:
        return float("inf"), False
    a, e = _prepare(actual, expected, mask)
    if e.numel() == 0:
        return 0.0, True
    atol, rtol = tol
    scale = magnitude_scale(e, min_scale)
    close = bool(torch.isclose(a, e, rtol=rtol, atol=atol * scale, equal_nan=True).all())
    err = ((a - e).abs().max() / scale).item()
    if err != err:  # NaN on one side only (both-NaN elements count as equal)
        err = 0.0 if close else float("inf")
    return err, close


def check_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    label: str = "",
    *,
    tol: Tolerance | None = None,
    min_scale: float = 1.0,
    mask: torch.Tensor | None = None,
) -> None:
    """:func:`torch.testing.assert_close` with a tolerance of this table, atol scaled by the magnitude.

    Both tensors are compared in float64 on the CPU, so a CUDA or half result can be checked against a
    float64 CPU reference directly.

    Args:
        actual: The result under test (output, dx, dweight, dbias, a running statistic...).
        expected: The reference.
        dtype: The dtype the result was computed in: selects ``TOLERANCES[dtype]`` when ``tol`` is None.
        label: Names the compared quantity in the failure message (e.g. ``"dweight step 2"``).
        tol: An explicit ``(atol, rtol)`` (a named entry of this module) instead of ``TOLERANCES[dtype]``.
        min_scale: Lower bound of the atol scale (:func:`magnitude_scale`).
        mask: Boolean tensor selecting the compared elements.

    Raises:
        AssertionError: The tensors are not close (the message starts with ``label``).
        ValueError: Neither ``dtype`` nor ``tol`` was given.
    """
    if tol is None:
        if dtype is None:
            raise ValueError("check_close needs a dtype (for TOLERANCES) or an explicit tol")
        tol = TOLERANCES[dtype]
    atol, rtol = tol
    a, e = _prepare(actual, expected, mask)
    scale = magnitude_scale(e, min_scale) if e.numel() else float(min_scale)
    torch.testing.assert_close(a, e, atol=atol * scale, rtol=rtol, msg=lambda m: f"{label}: {m}")
