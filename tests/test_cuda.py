"""CUDA kernels of torch.ops.inplace_abn: registration, numerics, op contract, memory.

Every test needs a GPU: it takes conftest's ``cuda_device`` fixture, which skips it without one (and marks
it ``cuda``), and runs with the "cpp" backend. ``test_cuda_kernels_registered`` fails on a GPU machine
whose extension was built without CUDA kernels: the other tests would then silently exercise the
pure-PyTorch path on CUDA tensors. Shared makers and tolerances come from tests/helpers.py.

(a) equivalence vs the float64 CPU reference (``inplace_abn.reference.batch_norm_act``): output, running
    statistics, num_batches_tracked, dx, dweight, dbias over shapes, activations, train/eval, affine,
    memory layouts (in place: same tensor, same data_ptr and strides) and reduced precision;
(b) CPU kernels vs CUDA kernels on identical inputs, every dtype;
(c) torch.library.opcheck of every op on CUDA tensors (the op samples of tests/helpers.py);
(d) exact saved-for-backward bytes (as tests/test_memory.py) and the allocator's peak of a conv stack;
(e) 64-bit indexing: statistics / forward_ / backward_reduce of a tensor with more than 2**31 elements;
(f) residual fusion: every op with a ``residual`` (and ``grad_residual``), CUDA vs CPU kernels on identical
    inputs, and ``absmax`` vs ``torch.amax(x.abs())``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ACT_BYTES,
    EPS,
    MEMORY_SHAPE,
    OPS,
    VEC_BYTES,
    check_close,
    layout_input,
    norm_stack,
    op_samples,
    random_input,
    saved_bytes,
    set_module_state,
    tolerance,
)
from torch import nn
from torch.testing import assert_close

import inplace_abn
from inplace_abn import InPlaceABN
from inplace_abn.functions import inplace_abn as inplace_abn_fn
from inplace_abn.memory import parameters_of, saved_tensor_bytes
from inplace_abn.reference import batch_norm_act

pytestmark = pytest.mark.filterwarnings("ignore:inplace_abn.*not invertible:RuntimeWarning")

HALF = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _cpp_backend(cuda_device):
    """Every test runs the compiled ops ("cpp"); a GPU machine without the extension fails here. Requesting
    ``cuda_device`` skips every test of this file before the backend is touched when there is no GPU."""
    with inplace_abn.use_backend("cpp"):
        yield


def to_cuda_strided(t, device):
    """A copy of ``t`` on ``device`` with exactly its sizes and strides (``.to`` makes gapped views
    contiguous)."""
    if not isinstance(t, torch.Tensor):
        return t
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
    out.copy_(t)
    return out


def run_cuda_equivalence(device, shape, activation, param, training, dtype=torch.float32, affine=True,
                         layout="contiguous", param_dtype=None, steps=2, tol=None):  # fmt: skip
    """InPlaceABN on ``device`` (CUDA) vs the float64 CPU reference for ``steps`` steps (the draws of
    tests/test_equivalence.run_equivalence, so reduced-precision cases see inputs validated on the CPU)."""
    c = shape[1]
    param_dtype = param_dtype or dtype
    m = InPlaceABN(c, EPS, 0.1, affine, True, activation, param)
    set_module_state(m, c, torch.float64)
    m = m.to(device=device, dtype=param_dtype).train(training)
    assert m.num_batches_tracked.device.type == "cuda" and m.num_batches_tracked.dtype == torch.long
    w_ref = m.weight.detach().to("cpu", torch.float64).requires_grad_() if affine else None
    b_ref = m.bias.detach().to("cpu", torch.float64).requires_grad_() if affine else None
    rm_ref = m.running_mean.detach().to("cpu", torch.float64)
    rv_ref = m.running_var.detach().to("cpu", torch.float64)
    count = 1
    for s in shape:
        count *= s
    count //= c
    for step in range(1, steps + 1):
        x0_cpu = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
        g_cpu = torch.randn(shape, dtype=torch.float64).to(dtype)
        x0 = x0_cpu.to(device, copy=True).requires_grad_()
        x = layout_input(x0, layout)
        ptr, strides = x.data_ptr(), x.stride()
        xr = x0_cpu.to(torch.float64, copy=True).requires_grad_()
        yr = batch_norm_act(xr, w_ref, b_ref, rm_ref, rv_ref, training, 0.1, EPS, activation, param)
        y = m(x)
        # in place: the very tensor, same memory, same strides (channels_last stays channels_last)
        assert y is x and y.data_ptr() == ptr and y.stride() == strides, f"not in place: {strides} -> {y.stride()}"
        assert y.device.type == "cuda" and y.dtype == dtype
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        if layout == "channels_last_3d":
            assert y.is_contiguous(memory_format=torch.channels_last_3d)
        check_close(y, yr, dtype, f"output step {step}", tol=tol)
        y.backward(g_cpu.to(device))
        yr.backward(g_cpu.double())
        check_close(x0.grad, xr.grad, dtype, f"dx step {step}", tol=tol)
        if affine:
            check_close(m.weight.grad, w_ref.grad, dtype, f"dweight step {step}", tol=tol, min_scale=count**0.5)
            check_close(m.bias.grad, b_ref.grad, dtype, f"dbias step {step}", tol=tol, min_scale=count**0.5)
        else:
            assert m.weight is None and m.bias is None
        check_close(m.running_mean, rm_ref, dtype, f"running_mean step {step}", tol=tol)
        check_close(m.running_var, rv_ref, dtype, f"running_var step {step}", tol=tol)
        assert m.num_batches_tracked.item() == (step if training else 0)


ACTIVATIONS = [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0), ("relu", 0.0)]
ACT_IDS = ["leaky", "elu", "identity", "relu"]
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------


def test_cuda_kernels_registered(cuda_device):
    """Every op has a CUDA kernel: otherwise CUDA tensors silently take the pure-PyTorch path."""
    assert inplace_abn.extension_loaded(), f"extension not loaded: {inplace_abn._backend.extension_error()}"
    missing = [op for op in OPS if not getattr(torch.ops.inplace_abn, op).default.has_kernel_for_dispatch_key("CUDA")]
    assert not missing, f"no CUDA kernel for {missing}: the extension was built without CUDA (FORCE_CUDA=1, CUDA_HOME)"
    assert inplace_abn._backend.has_kernel("cuda")


# ---------------------------------------------------------------------------------------------------
# (a) against the float64 reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
def test_activation_grid(cuda_device, dtype, activation, param, training, affine):
    run_cuda_equivalence(cuda_device, (5, 3, 7, 11), activation, param, training, dtype, affine=affine)


SHAPES = [
    (3, 7),  # 2-D
    (4, 1),  # 2-D, C = 1
    (256, 513),  # 2-D, many channels, few rows
    (6, 5, 9),  # 3-D
    (4, 1, 1000),  # 3-D, C = 1
    (5, 1, 7, 3),  # 4-D, C = 1
    (5, 3, 7, 11),  # 4-D, primes
    (16, 2048, 1, 1),  # 4-D, spatial 1, many channels
    (2, 5, 3, 4, 5),  # 5-D
    (1, 4, 67, 71),  # N = 1, large spatial
    (1, 3, 509, 521),  # N = 1, ~265k values per channel (multi-block reductions)
    (3, 1, 300, 301),  # C = 1, ~271k values
    (1, 2, 2),  # smallest trainable: 2 values per channel
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(cuda_device, shape, dtype, training):
    run_cuda_equivalence(cuda_device, shape, "leaky_relu", 0.01, training, dtype)


@pytest.mark.parametrize("activation,param", ACTIVATIONS[1:], ids=ACT_IDS[1:])
@pytest.mark.parametrize(
    "shape", [(1, 3, 509, 521), (4, 1, 1000), (16, 2048, 1, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_shapes_other_activations(cuda_device, shape, activation, param):
    run_cuda_equivalence(cuda_device, shape, activation, param, True, torch.float32)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
def test_input_layouts(cuda_device, dtype, activation, param, training, layout):
    """channels_last is processed in place; other strides through a copy written back into the view."""
    run_cuda_equivalence(cuda_device, (3, 4, 6, 5), activation, param, training, dtype, layout=layout)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(8, 32, 28, 28), (2, 3, 33, 65)], ids=lambda s: "x".join(map(str, s)))
def test_channels_last_larger(cuda_device, shape, training):
    run_cuda_equivalence(cuda_device, shape, "leaky_relu", 0.01, training, torch.float32, layout="channels_last")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_3d(cuda_device, training):
    run_cuda_equivalence(cuda_device, (2, 3, 4, 5, 3), "elu", 1.0, training, torch.float32, layout="channels_last_3d")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS[:3], ids=ACT_IDS[:3])
@pytest.mark.parametrize("dtype", HALF, ids=DTYPE_IDS.get)
def test_mixed_precision(cuda_device, dtype, activation, param, training):
    """Half inputs with float32 parameters and buffers (tolerances of inplace_abn.testing, as on the CPU)."""
    tol = tolerance(dtype, activation, training)
    run_cuda_equivalence(cuda_device, (4, 3, 6, 7), activation, param, training, dtype, param_dtype=torch.float32,
                         tol=tol)  # fmt: skip


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", HALF, ids=DTYPE_IDS.get)
def test_converted_module(cuda_device, dtype, training, layout):
    """module.half() / .bfloat16(): parameters and running buffers in reduced precision too."""
    run_cuda_equivalence(cuda_device, (4, 3, 6, 7), "leaky_relu", 0.1, training, dtype, param_dtype=dtype,
                         layout=layout)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# (b) CPU kernels vs CUDA kernels on identical inputs
# ---------------------------------------------------------------------------------------------------


def _one_step(x0, dy, weight, bias, rm, rv, training, activation, param, channels_last):
    """One forward + backward of the functional layer on the device of ``x0``; returns all results."""
    x0 = x0.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    rm, rv = rm.clone(), rv.clone()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x0.clone().contiguous(memory_format=fmt)
    y = inplace_abn_fn(x, weight, bias, rm, rv, training, 0.1, EPS, activation, param)
    assert y is x
    out = y.detach().clone()
    dx, dw, db = torch.autograd.grad(y, (x0, weight, bias), dy.contiguous(memory_format=fmt))
    return {"output": out, "dx": dx, "dweight": dw, "dbias": db, "running_mean": rm, "running_var": rv}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS[:3], ids=ACT_IDS[:3])
@pytest.mark.parametrize("shape,channels_last", [((8, 16, 13, 17), False), ((8, 16, 13, 17), True),
                                                  ((2, 5, 3, 4, 5), False), ((64, 33), False),
                                                  ((2, 3, 257, 255), False)],
                         ids=["4d", "4d-cl", "5d", "2d", "big-spatial"])  # fmt: skip
@pytest.mark.parametrize(
    "dtype,param_dtype",
    [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float16, torch.float16),
     (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
    ids=["f64", "f32", "f16", "bf16", "f16-f32params", "bf16-f32params"],
)  # fmt: skip
def test_cpu_cuda_agreement(cuda_device, dtype, param_dtype, shape, channels_last, activation, param, training):
    """The same inputs through the compiled CPU kernels and the CUDA kernels agree within the dtype's tolerance."""
    c = shape[1]
    # moderate scales |w| + eps in [0.4, 1.2]: ELU outputs stay away from saturation (x_hat unrecoverable)
    w = (torch.rand(c, dtype=torch.float64) * 0.8 + 0.4) * torch.where(torch.rand(c) < 0.5, -1.0, 1.0).double()
    b = torch.randn(c, dtype=torch.float64) * 0.3
    rm, rv = torch.randn(c, dtype=torch.float64) * 0.3, torch.rand(c, dtype=torch.float64) + 0.5
    x0 = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    args = [t.to(param_dtype) for t in (w, b, rm, rv)]
    cpu = _one_step(x0, dy, *args, training, activation, param, channels_last)
    gpu = _one_step(x0.to(cuda_device), dy.to(cuda_device), *[t.to(cuda_device) for t in args], training, activation,
                    param, channels_last)  # fmt: skip
    for name, v in gpu.items():
        assert v.device.type == "cuda" and v.dtype == cpu[name].dtype, f"{name}: {v.device} {v.dtype}"
    if channels_last:
        assert gpu["output"].is_contiguous(memory_format=torch.channels_last)
    tol = tolerance(dtype, activation, training)
    count = x0.numel() // c
    mask = None
    if activation == "elu":  # exactly saturated outputs: x_hat (so dx) is a convention, not a value
        mask = (cpu["output"] != -param) & (gpu["output"].cpu() != -param)
    for name in ("output", "dx", "dweight", "dbias", "running_mean", "running_var"):
        min_scale = count**0.5 if name in ("dweight", "dbias") else 1.0
        check_close(gpu[name], cpu[name], dtype, f"CUDA vs CPU {name}", tol=tol, min_scale=min_scale,
                    mask=mask if name == "dx" else None)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# (c) op contract on CUDA tensors
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(cuda_device, op, dtype):
    """torch.library.opcheck (schema, fake kernel vs CUDA kernel strides, AOT dispatch) on the samples
    of tests/test_ops.py moved to CUDA with their exact strides (a fresh copy per run for mutating ops)."""
    overload = getattr(torch.ops.inplace_abn, op).default
    samples = list(op_samples(op, dtype))
    assert samples, "no samples generated"
    for cpu_args in samples:
        args = tuple(to_cuda_strided(a, cuda_device) for a in cpu_args)
        assert all(a.is_cuda for a in args if isinstance(a, torch.Tensor))
        result = torch.library.opcheck(overload, args)
        failed = {k: v for k, v in result.items() if v != "SUCCESS"}
        shapes = [(tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a for a in args]
        assert not failed, f"{op} {dtype} {shapes}: {failed}"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_forward_writes_in_place(cuda_device, layout):
    """forward_ on CUDA writes into the input's own memory for every stride pattern, like the CPU kernel."""
    x_cpu = torch.randn(4, 3, 5, 12)
    if layout == "channels_last":
        x_cpu = x_cpu.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x_cpu = x_cpu[..., ::2]
    x = to_cuda_strided(x_cpu, cuda_device)
    ptr, strides = x.data_ptr(), x.stride()
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    torch.ops.inplace_abn.forward_(x_cpu, mean, var, None, None, 1e-5, "leaky_relu", 0.1)
    torch.ops.inplace_abn.forward_(x, mean.to(cuda_device), var.to(cuda_device), None, None, 1e-5, "leaky_relu", 0.1)
    assert x.data_ptr() == ptr and x.stride() == strides
    assert_close(x.cpu(), x_cpu)


# ---------------------------------------------------------------------------------------------------
# (d) memory
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation,param", ACTIVATIONS[:3], ids=ACT_IDS[:3])
def test_inplace_abn_saves_one_activation(cuda_device, activation, param):
    """Exactly y plus one (C,) float32 vector (the variance), as on the CPU (tests/test_memory.py)."""
    saved = saved_bytes(InPlaceABN(16, activation=activation, activation_param=param), device=cuda_device)
    assert saved == ACT_BYTES + VEC_BYTES, f"saved {saved} bytes, expected y ({ACT_BYTES}) + var ({VEC_BYTES})"


def test_relu_layer_keeps_pre_activation(cuda_device):
    assert saved_bytes(InPlaceABN(16, activation="relu"), device=cuda_device) == 2 * ACT_BYTES + VEC_BYTES


def test_eval_mode_saves_one_activation(cuda_device):
    assert saved_bytes(InPlaceABN(16).eval(), device=cuda_device) == ACT_BYTES


def test_batchnorm_pair_saves_at_least_two_activations(cuda_device):
    """The baseline on CUDA (cuDNN may add a reserve buffer, so at least, not exactly, two activations)."""
    saved = saved_bytes(nn.Sequential(nn.BatchNorm2d(16), nn.LeakyReLU(0.01, inplace=True)), device=cuda_device)
    assert saved >= 2 * ACT_BYTES, saved


def test_conv_stack_saving(cuda_device):
    """conv -> norm stack: In-Place ABN keeps one activation per layer (exact), BN + act at least two."""
    depth = 5
    saved = {}
    for norm in ("iabn", "bn"):
        model = norm_stack(norm, depth).to(cuda_device)
        x = torch.randn(MEMORY_SHAPE, device=cuda_device)
        saved[norm], _, _ = saved_tensor_bytes(lambda: model(x), exclude=parameters_of(model))
    assert saved["iabn"] == ACT_BYTES + depth * (ACT_BYTES + VEC_BYTES), saved
    assert saved["bn"] >= ACT_BYTES + depth * 2 * ACT_BYTES, saved


def _peak_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Allocator peak (above what was allocated before) of one forward + backward."""

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(x).float().square().mean()
        loss.backward()

    step()  # warm-up: cuDNN algorithm choice, parameter gradients, allocator pools
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_peak_memory_conv_stack(cuda_device):
    """6 x (Conv2d 3x3 + norm), batch 8, 64 channels, 64x64: In-Place ABN peaks lower than BN + LeakyReLU."""
    depth, c = 6, 64
    x = torch.randn(8, c, 64, 64, device=cuda_device)
    peaks = {}
    for norm in ("iabn", "bn"):
        layers = []
        for _ in range(depth):
            layers.append(nn.Conv2d(c, c, 3, padding=1, bias=False))
            layers += [InPlaceABN(c)] if norm == "iabn" else [nn.BatchNorm2d(c), nn.LeakyReLU(0.01, inplace=True)]
        model = nn.Sequential(*layers).to(cuda_device)
        peaks[norm] = _peak_bytes(model, x)
        del model
        torch.cuda.empty_cache()
    mib = {k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()}
    act_mib = x.numel() * 4 / 2**20
    assert peaks["iabn"] < peaks["bn"], (
        f"peak memory: InPlaceABN stack {mib['iabn']}, BatchNorm2d + LeakyReLU(inplace) stack {mib['bn']} "
        f"(one activation = {act_mib:.1f} MiB)"
    )


# ---------------------------------------------------------------------------------------------------
# (e) 64-bit indexing
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_large_tensor_64bit_indexing(cuda_device):
    """A float16 (2, 2, 2**29 + 17) tensor (> 2**31 elements, 4 GiB): statistics, forward_ and
    backward_reduce against exact float64 values of a known periodic pattern."""
    total = torch.cuda.get_device_properties(0).total_memory
    if total <= 24 * 2**30:
        pytest.skip(f"needs a GPU with more than 24 GiB (this one has {total / 2**30:.1f} GiB)")
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip(f"needs 12 GiB of free GPU memory ({free / 2**30:.1f} GiB free)")
    n, c, s = 2, 2, 2**29 + 17
    assert n * c * s > 2**31
    period = 7
    # channel 0: k - 3 (k = index mod 7); channel 1: 100 + (k - 3) / 2 (a large mean: cancellation test).
    # Every value is exact in float16.
    values = [[float(k - 3) for k in range(period)], [100.0 + (k - 3) / 2 for k in range(period)]]
    x = torch.empty((n, c, s), dtype=torch.float16, device=cuda_device)
    k = torch.arange(s, device=cuda_device, dtype=torch.int32).remainder_(period)
    for ch in range(c):
        row = torch.tensor(values[ch], dtype=torch.float16, device=cuda_device)[k]
        for i in range(n):
            x[i, ch].copy_(row)
        del row
    del k
    counts = [n * (s // period + (1 if r < s % period else 0)) for r in range(period)]
    count = n * s
    exp_mean, exp_var = [], []
    for ch in range(c):
        m = sum(cnt * v for cnt, v in zip(counts, values[ch])) / count
        exp_mean.append(m)
        exp_var.append(sum(cnt * (v - m) ** 2 for cnt, v in zip(counts, values[ch])) / count)
    exp_mean_t = torch.tensor(exp_mean, dtype=torch.float64)
    exp_var_t = torch.tensor(exp_var, dtype=torch.float64)

    mean, var = torch.ops.inplace_abn.statistics(x)
    torch.cuda.synchronize()
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (c,)
    assert_close(mean.cpu().double(), exp_mean_t, rtol=1e-5, atol=1e-5, msg=lambda m: f"mean: {m}")
    assert_close(var.cpu().double(), exp_var_t, rtol=1e-4, atol=1e-5, msg=lambda m: f"var: {m}")

    # forward_ (identity, no affine) must write every element, also beyond 2**31.
    torch.ops.inplace_abn.forward_(x, mean, var, None, None, 1e-5, "identity", 0.0)
    torch.cuda.synchronize()
    flat = x.view(-1)
    exp_y = [[(v - exp_mean[ch]) / (exp_var[ch] + 1e-5) ** 0.5 for v in values[ch]] for ch in range(c)]
    probes = [(0, 0, 0), (0, 0, 1), (0, 1, 2), (1, 0, s - 1), (1, 1, s - 1), (1, 1, s - 6)]
    last_offset = (2**31 + 5) - (n - 1) * c * s - s  # an element past 2**31: (1, 1, last_offset)
    assert 0 <= last_offset < s
    probes.append((1, 1, last_offset))
    for i, ch, j in probes:
        got = flat[(i * c + ch) * s + j].item()
        want = exp_y[ch][j % period]
        assert abs(got - want) <= 2e-3 * max(1.0, abs(want)), f"y[{i}, {ch}, {j}] = {got}, expected {want}"

    # backward_reduce with dy = y, identity: sum(dz) = sum(y), sum(dz * x_hat) = sum(y^2) (x_hat = y).
    # Expected from the actual float16 outputs of each residue (read from the last (n, c) block).
    y_vals = [[flat[(1 * c + ch) * s + r].item() for r in range(period)] for ch in range(c)]
    sum_dz, sum_dz_xhat = torch.ops.inplace_abn.backward_reduce(x, x, None, None, 1e-5, "identity", 0.0)
    torch.cuda.synchronize()
    exp_dz = torch.tensor([sum(cnt * y for cnt, y in zip(counts, y_vals[ch])) for ch in range(c)], dtype=torch.float64)
    exp_dzx = torch.tensor([sum(cnt * y * y for cnt, y in zip(counts, y_vals[ch])) for ch in range(c)],
                           dtype=torch.float64)  # fmt: skip
    # float32 accumulation over 2**30 values: relative 1e-4 of the count (exact values are O(count))
    assert_close(sum_dz.cpu().double(), exp_dz, rtol=1e-4, atol=1e-5 * count, msg=lambda m: f"sum_dz: {m}")
    assert_close(sum_dz_xhat.cpu().double(), exp_dzx, rtol=1e-4, atol=1e-5 * count, msg=lambda m: f"sum_dz_xhat: {m}")
    del x, flat
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# (f) residual fusion and absmax
# ---------------------------------------------------------------------------------------------------

RESIDUAL_SHAPE = (8, 16, 13, 17)
# memory formats of x (and y, dy) and of the residual: "mixed" walks the kernels' copy path (the residual
# brought into y's layout first).
RESIDUAL_LAYOUTS = {
    "contiguous": (torch.contiguous_format, torch.contiguous_format),
    "channels_last": (torch.channels_last, torch.channels_last),
    "mixed": (torch.channels_last, torch.contiguous_format),
}


def _residual_inputs(dtype, activation, param, layout):
    """CPU inputs shared by both backends: x, residual, dy in their layouts, opmath parameters, and a valid
    layer output y (with its batch var and the backward means) made by the CPU kernels."""
    fmt, r_fmt = RESIDUAL_LAYOUTS[layout]
    c = RESIDUAL_SHAPE[1]
    op_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # moderate scales |w| + eps in [0.4, 1.2], as test_cpu_cuda_agreement: ELU stays away from saturation
    w = (torch.rand(c, dtype=torch.float64) * 0.8 + 0.4) * torch.where(torch.rand(c) < 0.5, -1.0, 1.0).double()
    b = torch.randn(c, dtype=torch.float64) * 0.3
    x = (torch.randn(RESIDUAL_SHAPE, dtype=torch.float64) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    r = torch.randn(RESIDUAL_SHAPE, dtype=torch.float64).to(dtype).contiguous(memory_format=r_fmt)
    dy = torch.randn(RESIDUAL_SHAPE, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    inp = {"x": x, "residual": r, "dy": dy, "weight": w.to(op_dtype), "bias": b.to(op_dtype),
           "running_mean": torch.randn(c, dtype=op_dtype) * 0.3, "running_var": torch.rand(c, dtype=op_dtype) + 0.5,
           "mean": torch.randn(c, dtype=op_dtype) * 0.3, "var": torch.rand(c, dtype=op_dtype) + 0.5}  # fmt: skip
    y = x.clone()
    _, batch_var = torch.ops.inplace_abn.forward_train_(y, inp["weight"], inp["bias"], None, None, 0.1, EPS,
                                                        activation, param, r)  # fmt: skip
    sum_dz, sum_dz_xhat = torch.ops.inplace_abn.backward_reduce(y, dy, inp["weight"], inp["bias"], EPS, activation,
                                                                param, r)  # fmt: skip
    count = x.numel() // c
    inp.update(y=y, batch_var=batch_var, mean_dz=sum_dz / count, mean_dz_xhat=sum_dz_xhat / count)
    return inp


def _residual_results(inp, activation, param, device):
    """Every op with a residual on ``device``, on copies of ``inp`` with their exact strides: the outputs and
    the mutated arguments (forward_'s x, forward_train_'s x and running statistics)."""
    t = {k: to_cuda_strided(v, device) for k, v in inp.items()}
    ops = torch.ops.inplace_abn
    w, b, r, y, dy = t["weight"], t["bias"], t["residual"], t["y"], t["dy"]
    out = {}

    x = t["x"].clone()
    ptr, strides = x.data_ptr(), x.stride()
    ops.forward_(x, t["mean"], t["var"], w, b, EPS, activation, param, r)
    assert x.data_ptr() == ptr and x.stride() == strides
    out["forward_ y"] = x

    x = t["x"].clone()
    ptr = x.data_ptr()
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    mean, var = ops.forward_train_(x, w, b, rm, rv, 0.1, EPS, activation, param, r)
    assert x.data_ptr() == ptr and x.stride() == strides
    out.update({"forward_train_ y": x, "forward_train_ mean": mean, "forward_train_ var": var,
                "forward_train_ running_mean": rm, "forward_train_ running_var": rv})  # fmt: skip

    out["backward_reduce sum_dz"], out["backward_reduce sum_dz_xhat"] = ops.backward_reduce(
        y, dy, w, b, EPS, activation, param, r
    )
    for mode, (m1, m2) in {"train": (t["mean_dz"], t["mean_dz_xhat"]), "eval": (None, None)}.items():
        var = t["batch_var"] if mode == "train" else t["running_var"]
        dx, grad_residual = ops.backward(y, dy, var, w, b, m1, m2, EPS, activation, param, r)
        out[f"backward {mode} dx"], out[f"backward {mode} grad_residual"] = dx, grad_residual
    dx, gw, gb, grad_residual = ops.backward_train(y, dy, t["batch_var"], w, b, EPS, activation, param, r)
    out.update({"backward_train dx": dx, "backward_train grad_weight": gw, "backward_train grad_bias": gb,
                "backward_train grad_residual": grad_residual})  # fmt: skip
    out["invert x_hat"] = ops.invert(y, w, b, EPS, activation, param, r)
    for name in ("backward train", "backward eval", "backward_train"):
        # dL/dresidual has y's shape and strides, like dx
        g = out[f"{name} grad_residual"]
        assert g.shape == y.shape and g.stride() == y.stride() and g.dtype == y.dtype, f"{name} grad_residual"
    return out


@pytest.mark.parametrize("layout", list(RESIDUAL_LAYOUTS))
@pytest.mark.parametrize("activation,param", ACTIVATIONS[:3], ids=ACT_IDS[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_residual_cpu_cuda_agreement(cuda_device, dtype, activation, param, layout):
    """Every op with a residual (forward_, forward_train_, backward_reduce, backward in train and eval mode,
    backward_train, invert), grad_residual included: the CUDA kernels agree with the CPU kernels on identical
    inputs, with the CPU results' dtypes, shapes and strides."""
    inp = _residual_inputs(dtype, activation, param, layout)
    cpu = _residual_results(inp, activation, param, "cpu")
    gpu = _residual_results(inp, activation, param, cuda_device)
    assert cpu.keys() == gpu.keys()
    tol = tolerance(dtype, activation, True)
    count = inp["x"].numel() // RESIDUAL_SHAPE[1]
    # exactly saturated ELU outputs: x_hat (so dx and the inversion) is a convention, not a value
    mask = (inp["y"] != -param) if activation == "elu" else None
    for name, expected in cpu.items():
        got = gpu[name]
        assert got.device.type == "cuda" and got.dtype == expected.dtype, f"{name}: {got.device} {got.dtype}"
        assert got.shape == expected.shape and got.stride() == expected.stride(), (
            f"{name}: strides {got.stride()} on CUDA, {expected.stride()} on the CPU"
        )
        reduced = name.startswith(("backward_reduce", "backward_train grad_weight", "backward_train grad_bias"))
        inverted = name.endswith((" dx", "x_hat"))
        check_close(got, expected, dtype, f"residual {name}", tol=tol, min_scale=count**0.5 if reduced else 1.0,
                    mask=mask if inverted else None)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_residual_zero_matches_no_residual(cuda_device, dtype):
    """A zero residual reproduces the layer without one bit for bit (z - 0 == z); grad_residual is dz, and
    the empty (0,) tensor without a residual."""
    inp = _residual_inputs(dtype, "leaky_relu", 0.01, "contiguous")
    t = {k: v.to(cuda_device) for k, v in inp.items()}
    zero = torch.zeros_like(t["x"])
    ops = torch.ops.inplace_abn
    a, b = t["x"].clone(), t["x"].clone()
    ops.forward_(a, t["mean"], t["var"], t["weight"], t["bias"], EPS, "leaky_relu", 0.01)
    ops.forward_(b, t["mean"], t["var"], t["weight"], t["bias"], EPS, "leaky_relu", 0.01, zero)
    assert torch.equal(a, b)
    args = (t["y"], t["dy"], t["batch_var"], t["weight"], t["bias"], EPS, "leaky_relu", 0.01)
    *with_r, grad_residual = ops.backward_train(*args, zero)
    *without, none = ops.backward_train(*args)
    for u, v in zip(with_r, without):
        assert torch.equal(u, v)
    assert none.shape == (0,) and none.device.type == "cuda" and none.dtype == dtype
    dz = torch.where(t["y"] > 0, t["dy"], (t["dy"].to(torch.float32) * 0.01).to(dtype))
    assert_close(grad_residual, dz, rtol=0, atol=0)
    _, none = ops.backward(t["y"], t["dy"], t["batch_var"], t["weight"], t["bias"], None, None, EPS, "leaky_relu",
                           0.01)  # fmt: skip
    assert none.shape == (0,) and none.device.type == "cuda"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 5), (1, 3, 509, 521), (16, 2048, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
def test_absmax(cuda_device, shape, dtype, layout):
    """absmax == torch.amax(x.abs()) per channel, exactly, in the opmath dtype, for every layout; NaN in a
    channel that holds one (at its first or its last element), like torch.amax; the CPU kernel agrees."""
    if layout != "contiguous" and len(shape) != 4:
        pytest.skip("channels_last / strided need a 4-D input")
    x = random_input(shape, dtype, layout)
    x.mul_(3)  # in place: a strided view stays strided
    c = shape[1]
    x[(0, 0) + (0,) * (len(shape) - 2)] = float("nan")  # channel 0, first element
    if c > 2:
        x[tuple(s - 1 for s in shape)] = float("nan")  # channel C - 1, last element
        x[(shape[0] // 2, 1) + tuple(s // 2 for s in shape[2:])] = -1e3  # channel 1: its max |x|, negative
    xg = to_cuda_strided(x, cuda_device)
    got = torch.ops.inplace_abn.absmax(xg)
    op_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.device.type == "cuda" and got.dtype == op_dtype and got.shape == (c,)
    expected = torch.amax(x.abs(), dim=[0] + list(range(2, len(shape)))).to(op_dtype)
    assert_close(got.cpu(), expected, rtol=0, atol=0, equal_nan=True)
    assert got[0].isnan().item()
    if c > 2:
        assert got[c - 1].isnan().item() and got[1].item() == 1e3
        assert not got[1 : c - 1].isnan().any().item()
    assert_close(got.cpu(), torch.ops.inplace_abn.absmax(x), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_absmax_empty(cuda_device, dtype):
    """absmax of an empty batch: zeros (no value exceeds 0), in the opmath dtype."""
    got = torch.ops.inplace_abn.absmax(torch.empty((0, 3, 4), dtype=dtype, device=cuda_device))
    assert got.dtype == torch.float32 and torch.equal(got.cpu(), torch.zeros(3))


def test_float64_running_buffers_of_a_float32_layer_are_updated_in_float64(cuda_device):
    """float32 input, float64 running statistics: the update runs in float64 as on the CPU (it used to be
    rounded to float32 every step on CUDA, a drift the CPU and the pure-PyTorch path do not have)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    rm = torch.tensor([0.1, 1e-9, -0.3], dtype=torch.float64) + 1.0 / 3.0
    rv = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64) + 1e-12
    cpu = (rm.clone(), rv.clone())
    dev = (rm.to(cuda_device), rv.to(cuda_device))
    w, b = torch.ones(3), torch.zeros(3)
    for stats, device in ((cpu, "cpu"), (dev, cuda_device)):
        for _ in range(3):
            xd, wd, bd = x.clone().to(device), w.to(device), b.to(device)
            inplace_abn_fn(xd, wd, bd, *stats, True, 0.1, EPS, "leaky_relu", 0.01)
    for got, want in zip(dev, cpu):
        assert got.dtype == torch.float64
        # float32 statistics (the same up to the reduction order), float64 update: far below float32's ulp
        assert_close(got.cpu(), want, rtol=1e-6, atol=1e-7)
        assert not torch.equal(got.cpu().float().double(), got.cpu())  # not rounded to float32
