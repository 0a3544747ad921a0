"""Mixed precision and memory formats of InPlaceABN.

(a) autocast (CPU bf16; CUDA fp16/bf16, ``cuda``-marked): Conv2d -> InPlaceABN with float32 parameters; the
    conv output is half, so the layer gets a half input with float32 weights. Output, grads and running
    stats vs the float32 model, running stats stay float32 and are computed in float32.
(b) modules and inputs cast with ``.half()`` / ``.bfloat16()`` (CPU, both backends).
(c) channels_last / channels_last_3d: the output keeps the input's memory format and storage (in place),
    dx has the same format, and (backend "cpp") the forward makes no full-size copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from helpers import (
    HALF_LAYER_TOLERANCES,
    HALF_MODEL_GRAD_NORM_RTOL,
    HALF_MODEL_TOLERANCES,
    LAYOUT_TOLERANCES,
    STATS_RTOL,
    check_close,
)
from torch.testing import assert_close

import inplace_abn
from inplace_abn import InPlaceABN


def check_norm(actual, expected, rtol, msg=""):
    a, e = actual.detach().double(), expected.detach().double()
    err = ((a - e).norm() / e.norm()).item()
    assert err <= rtol, f"{msg}: relative L2 error {err:.3e} > {rtol}"


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

C = 8


def check_step(got, ref, dtype, mode):
    """Every result of ``step`` against the float32 reference: gradients by relative norm
    (HALF_MODEL_GRAD_NORM_RTOL: a few elements may sit on the other side of the activation's kink in reduced
    precision), the rest elementwise (HALF_MODEL_TOLERANCES)."""
    for key in ref:
        if key == "conv_out" or key.endswith("num_batches_tracked"):
            continue
        if key == "dx" or key.startswith("grad."):
            check_norm(got[key], ref[key], HALF_MODEL_GRAD_NORM_RTOL[dtype], msg=key)
        else:
            check_close(got[key], ref[key], dtype, f"{key} ({mode} vs float32 model)", tol=HALF_MODEL_TOLERANCES[dtype])


def make_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), InPlaceABN(C, activation="leaky_relu",
                                                                               activation_param=0.01))  # fmt: skip
    with torch.no_grad():
        w = torch.randn(C) * 1.5
        w = torch.where(w.abs() < 0.3, w.sign() * 0.3 + w, w)
        model[1].weight.copy_(w)
        model[1].bias.copy_(torch.randn(C) * 0.5)
    return model


def step(model, x, w, autocast_device=None, dtype=None):
    """One training step; returns out (float), dx, grads, buffers, and the layer's input (the conv output)."""
    x = x.clone().requires_grad_()
    captured = {}

    def capture(module, inputs, output):  # returns None: a forward hook's return value replaces the output
        captured["conv_out"] = output.detach().clone()

    hook = model[0].register_forward_hook(capture)
    try:
        if autocast_device is not None:
            with torch.autocast(autocast_device, dtype=dtype):
                out = model(x)
        else:
            out = model(x)
    finally:
        hook.remove()
    (out.float() * w).sum().backward()
    rec = {"out": out.detach(), "dx": x.grad}
    rec.update({"grad." + n: p.grad for n, p in model.named_parameters()})
    rec.update({"buf." + n: b.clone() for n, b in model.named_buffers()})
    rec["conv_out"] = captured["conv_out"]
    return rec


# ------------------------------------------------------------------------------------------ (a) autocast
def _autocast_case(device, dtype, backend):
    model = make_model().to(device)
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 10, 12, generator=gen).to(device)
    w = torch.randn(4, C, 10, 12, generator=gen).to(device)
    mixed = step(model, x, w, device, dtype)
    ref = step(reference, x, w)
    layer = model[1]
    assert mixed["conv_out"].dtype == dtype, "autocast should run the conv in the half type"
    assert mixed["out"].dtype == dtype
    assert layer.weight.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    for name in ("running_mean", "running_var"):
        assert getattr(layer, name).dtype == torch.float32, name
    assert layer.num_batches_tracked.item() == 1
    check_step(mixed, ref, dtype, "autocast")

    # statistics in float32: running_mean = momentum * mean, running_var = (1 - m) + m * unbiased var
    xin = mixed["conv_out"].to(torch.float64)
    mean = xin.mean(dim=(0, 2, 3))
    var = xin.var(dim=(0, 2, 3), unbiased=True)
    assert_close(layer.running_mean.double(), 0.1 * mean, rtol=STATS_RTOL, atol=1e-7)
    assert_close(layer.running_var.double(), 0.9 + 0.1 * var, rtol=STATS_RTOL, atol=1e-7)

    # layer-only: the half layer vs the float32 layer on the same half-valued input
    lt = HALF_LAYER_TOLERANCES[dtype]
    ref_layer = copy.deepcopy(layer)
    ref_layer.reset_running_stats()
    half_layer = copy.deepcopy(ref_layer)
    x16 = mixed["conv_out"].clone().requires_grad_()
    x32 = mixed["conv_out"].float().requires_grad_()
    dy = torch.randn(x16.shape, generator=gen).to(device)
    with torch.autocast(device, dtype=dtype):
        y16 = half_layer(x16.clone())
    y32 = ref_layer(x32.clone())
    (y16.float() * dy).sum().backward()
    (y32 * dy).sum().backward()
    check_close(y16, y32, dtype, "layer y", tol=lt)
    check_close(x16.grad, x32.grad, dtype, "layer dx", tol=lt)
    check_close(half_layer.weight.grad, ref_layer.weight.grad, dtype, "layer dweight", tol=lt)
    check_close(half_layer.bias.grad, ref_layer.bias.grad, dtype, "layer dbias", tol=lt)
    assert_close(half_layer.running_mean, ref_layer.running_mean, rtol=STATS_RTOL, atol=1e-7)
    assert_close(half_layer.running_var, ref_layer.running_var, rtol=STATS_RTOL, atol=1e-7)


def test_cpu_autocast_bf16(backend):
    _autocast_case("cpu", torch.bfloat16, backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_autocast(cuda_device, dtype):
    with inplace_abn.use_backend("cpp"):
        _autocast_case(cuda_device, dtype, "cpp")


# ---------------------------------------------------------------------------------- (b) cast modules
def _cast_case(device, dtype):
    model = make_model().to(device)
    reference = copy.deepcopy(model)
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(2)
    # the input is rounded to the half type first so both models see the same values
    x = torch.randn(4, 3, 10, 12, generator=gen).to(dtype).to(device)
    w = torch.randn(4, C, 10, 12, generator=gen).to(device)
    half = step(model, x, w)
    ref = step(reference, x.float(), w)
    layer = model[1]
    assert half["out"].dtype == dtype and half["dx"].dtype == dtype
    assert layer.running_mean.dtype == dtype  # .to(dtype) converts the buffers, as for nn.BatchNorm2d
    check_step(half, ref, dtype, f"model.to({dtype})")
    assert layer.num_batches_tracked.item() == 1
    # statistics computed in float32 then stored in the buffer dtype: equal to the float64 mean of the
    # half conv output, up to the final rounding to the buffer dtype (half an ulp)
    xin = half["conv_out"].to(torch.float64)
    expected = (0.1 * xin.mean(dim=(0, 2, 3))).to(dtype).double()
    ulp = torch.finfo(dtype).eps
    assert_close(layer.running_mean.double(), expected, rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cast_module_cpu(backend, dtype):
    _cast_case("cpu", dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cast_module_cuda(cuda_device, dtype):
    with inplace_abn.use_backend("cpp"):
        _cast_case(cuda_device, dtype)


# ------------------------------------------------------------------------------------- (c) channels_last
LAYOUTS = [
    ((4, C, 10, 12), torch.channels_last),
    ((2, C, 4, 6, 5), torch.channels_last_3d),
]
LAYOUT_IDS = ["channels_last", "channels_last_3d"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_memory_format_kept(backend, shape, fmt, dtype, train):
    layer = InPlaceABN(C, activation="elu", activation_param=1.0).train(train)
    x0 = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    x = x0.clone(memory_format=torch.preserve_format)
    assert x.is_contiguous(memory_format=fmt) and not x.is_contiguous()
    ptr = x.data_ptr()
    grads = {}
    x.register_hook(lambda g: grads.setdefault("dx", g))
    y = layer(x)
    assert y is x and y.data_ptr() == ptr, "not in place"
    assert y.is_contiguous(memory_format=fmt)
    y.backward(torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt))
    assert grads["dx"].is_contiguous(memory_format=fmt), grads["dx"].stride()
    # and the result equals the contiguous computation
    ref_layer = InPlaceABN(C, activation="elu", activation_param=1.0).train(train)
    y_ref = ref_layer(x0.detach().contiguous().clone())
    check_close(y, y_ref, dtype, "y vs contiguous", tol=LAYOUT_TOLERANCES[dtype])


_COPY_OPS = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to", "aten::empty_like",
             "aten::empty", "aten::empty_strided"}  # fmt: skip


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_channels_last_forward_no_full_copy(shape, fmt, train):
    """backend "cpp": the forward of a channels_last input allocates nothing of full size and calls no
    copy op on a full-size tensor (the python path may use temporaries, so it is not checked)."""
    if not inplace_abn.extension_loaded():
        pytest.skip("compiled extension not loaded")
    from torch.profiler import ProfilerActivity, profile

    with inplace_abn.use_backend("cpp"):
        layer = InPlaceABN(C).train(train)
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_().clone()
        layer(x.detach().clone())  # warm-up
        full_bytes = x.numel() * x.element_size()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
            y = layer(x)
    assert y.data_ptr() == x.data_ptr()
    offenders = []
    allocated = 0
    for ev in prof.events():
        mem = getattr(ev, "cpu_memory_usage", 0) or 0
        if mem > 0 and ev.cpu_parent is None:
            allocated += mem
        if mem >= full_bytes // 2:
            offenders.append((ev.name, mem))
        if ev.name in _COPY_OPS and any(list(s) == list(shape) for s in (ev.input_shapes or [])):
            offenders.append((ev.name, ev.input_shapes))
    assert not offenders, f"full-size copies/allocations in the forward: {offenders}"
    assert allocated < full_bytes // 2, f"forward allocated {allocated} B, input is {full_bytes} B"
