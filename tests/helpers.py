"""Shared test helpers: test-data makers, the op samples, memory-accounting helpers, and re-exports of the
package's tolerance table and comparison helper (``inplace_abn.testing``, also used by the selftest).

Test modules import from here (``from helpers import ...``; tests/ is on sys.path, see conftest.py) and
never from one another.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from inplace_abn import InPlaceABN, pure_backend
from inplace_abn.memory import parameters_of, saved_tensor_bytes
from inplace_abn.testing import (  # noqa: F401 - re-exported
    COMPILED_TOLERANCES,
    ELU_HALF_TOL,
    HALF_LAYER_TOLERANCES,
    HALF_MODEL_GRAD_NORM_RTOL,
    HALF_MODEL_TOLERANCES,
    LAYOUT_TOLERANCES,
    STATS_RTOL,
    TOLERANCES,
    ZERO_WEIGHT_F64_TOL,
    check_close,
    magnitude_scale,
    scaled_error,
    tolerance,
)

EPS = 1e-5

# ---------------------------------------------------------------------------------------------------
# parameters, module state and inputs
# ---------------------------------------------------------------------------------------------------


def make_weight(c, dtype=torch.float64, zero=False):
    """Weights with mixed signs and magnitudes (optionally a zero entry), drawn from the global RNG."""
    w = torch.randn(c, dtype=torch.float64) * 1.5
    w = torch.where(w.abs() < 0.2, w.sign() * 0.2 + w, w)  # keep g away from eps unless asked
    if c > 1:
        w[0] = -abs(w[0].item())  # at least one negative weight
    if zero:
        w[-1] = 0.0
    return w.to(dtype)


def set_module_state(m, c, dtype=torch.float64, in_place_weight=True):
    """Random parameters and running buffers (so eval is not just the identity map).

    ``in_place_weight=False`` is for an ``nn.BatchNorm`` standing in for the in-place layer: its weight is
    ``|w| + eps`` of the same draw. The draws (and their order) are the same either way.
    """
    with torch.no_grad():
        if m.weight is not None:
            w = make_weight(c)
            m.weight.copy_(w if in_place_weight else w.abs() + m.eps)
            m.bias.copy_(torch.randn(c, dtype=torch.float64) * 0.5)
        if m.running_mean is not None:
            m.running_mean.copy_(torch.randn(c, dtype=torch.float64) * 0.3)
            m.running_var.copy_(torch.rand(c, dtype=torch.float64) + 0.5)


def layout_input(x0, layout):
    """A non-leaf input built from the leaf ``x0`` (the layer writes into it) in the requested layout, on
    ``x0``'s device: contiguous, channels_last, channels_last_3d, transposed or sliced (stride 2)."""
    if layout == "contiguous":
        return x0.clone()
    if layout == "channels_last":
        x = x0.clone().contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
        return x
    if layout == "channels_last_3d":
        x = x0.clone().contiguous(memory_format=torch.channels_last_3d)
        assert not x.is_contiguous()
        return x
    if layout == "transposed":
        # (N, C, H, W) view of a (N, C, W, H) buffer: non-contiguous; the layer writes into the view.
        x = x0.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not x.is_contiguous() and x._base is not None
        return x
    if layout == "sliced":
        # Every other element of a wider buffer along the last dim (stride 2), filled from x0 through
        # the view so autograd links it to x0; the layer then writes into that strided view.
        buf = torch.zeros(x0.shape[:-1] + (2 * x0.shape[-1],), dtype=x0.dtype, device=x0.device)
        view = buf[..., ::2]
        view.copy_(x0)
        assert not view.is_contiguous() and view._base is buf
        return view
    raise AssertionError(layout)


def random_input(shape, dtype, layout="contiguous"):
    """A fresh random tensor of ``shape`` in a memory layout: contiguous, channels_last or strided (a
    non-dense view: every other column of a wider tensor)."""
    if layout == "channels_last":
        return torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.randn(shape[:-1] + (2 * shape[-1],), dtype=dtype)
        return wide[..., ::2]
    if layout != "contiguous":
        raise AssertionError(layout)
    return torch.randn(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# torch.ops.inplace_abn samples (opcheck on the CPU and on CUDA)
# ---------------------------------------------------------------------------------------------------

OPS = ["statistics", "absmax", "forward_", "backward_reduce", "backward", "invert", "forward_train_", "backward_train"]
OP_ACTIVATIONS = [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0)]


def op_samples(op: str, dtype: torch.dtype) -> Iterator[tuple]:
    """Argument tuples of ``torch.ops.inplace_abn.<op>`` on the CPU: every layout, activation, affine or
    not, eval / training variants, an empty batch, with and without a residual (contiguous, whatever
    x's layout); the parameters in the op's opmath dtype."""
    shapes = [((4, 3, 5, 6), "contiguous"), ((4, 3, 5, 6), "channels_last"), ((4, 3, 5, 6), "strided"),
              ((7, 5), "contiguous"), ((2, 3, 2, 3, 4), "contiguous"), ((0, 3, 4), "contiguous")]  # fmt: skip
    op_dtype = pure_backend.opmath_dtype(dtype)
    for (shape, layout), (act, p) in zip(shapes, OP_ACTIVATIONS * 2):
        x = random_input(shape, dtype, layout)
        c = shape[1]
        w = torch.randn(c, dtype=op_dtype)
        b = torch.randn(c, dtype=op_dtype)
        mean, var = torch.randn(c, dtype=op_dtype), torch.rand(c, dtype=op_dtype) + 0.5
        if act == "elu":
            y = torch.nn.functional.elu(x.float(), p).to(dtype)  # a valid ELU output (> -alpha)
        else:
            y = x
        dy = random_input(shape, dtype, "contiguous")
        r = random_input(shape, dtype, "contiguous")
        weight, bias = (w, b) if layout != "strided" else (None, None)
        if op == "statistics":
            if x.numel() > 0:  # the statistics of nothing are NaN, which opcheck's comparison rejects
                yield (x,)
        elif op == "absmax":
            yield (x,)
        elif op == "forward_":
            yield (x, mean, var, weight, bias, 1e-5, act, p)
            yield (x, mean, var, weight, bias, 1e-5, act, p, r)
        elif op == "backward_reduce":
            yield (y, dy, weight, bias, 1e-5, act, p)
            yield (y, dy, weight, bias, 1e-5, act, p, r)
        elif op == "backward":
            yield (y, dy, var, weight, bias, mean, var, 1e-5, act, p)
            yield (y, dy, var, weight, bias, None, None, 1e-5, act, p)  # eval mode
            yield (y, dy, var, weight, bias, mean, var, 1e-5, act, p, r)
            yield (y, dy, var, weight, bias, None, None, 1e-5, act, p, r)
        elif op == "invert":
            yield (y, weight, bias, 1e-5, act, p)
            yield (y, weight, bias, 1e-5, act, p, r)
        elif op == "forward_train_":
            if x.numel() > 0:
                yield (x, weight, bias, None, None, 0.1, 1e-5, act, p)
                # running statistics in the opmath dtype, and (the usual buffers) in float32
                yield (
                    x,
                    weight,
                    bias,
                    torch.zeros(c, dtype=op_dtype),
                    torch.ones(c, dtype=op_dtype),
                    0.1,
                    1e-5,
                    act,
                    p,
                )
                yield (x, weight, bias, torch.zeros(c), torch.ones(c), 1.0, 1e-5, act, p)
                yield (x, weight, bias, torch.zeros(c), torch.ones(c), 0.1, 1e-5, act, p, r)
        elif op == "backward_train":
            yield (y, dy, var, weight, bias, 1e-5, act, p)
            yield (y, dy, var, weight, bias, 1e-5, act, p, r)


# ---------------------------------------------------------------------------------------------------
# saved-for-backward accounting (tests/test_memory.py, and its CUDA twin in tests/test_cuda.py)
# ---------------------------------------------------------------------------------------------------

MEMORY_SHAPE = (4, 16, 12, 10)
ACT_BYTES = 4 * 16 * 12 * 10 * 4  # one float32 activation of MEMORY_SHAPE
VEC_BYTES = 16 * 4  # one float32 per-channel vector


def saved_bytes(layer: nn.Module, device: str = "cpu") -> int:
    """Bytes ``layer`` saves for backward on a fresh non-leaf input of MEMORY_SHAPE (parameters excluded)."""
    layer = layer.to(device)
    base = torch.randn(MEMORY_SHAPE, device=device, requires_grad=True)
    # The layer input is a fresh non-leaf (a conv output in a real network).
    total, _, _ = saved_tensor_bytes(lambda: layer(base * 1.0), exclude=parameters_of(layer) + [base])
    return total


def norm_stack(norm: str, depth: int) -> nn.Sequential:
    """``depth`` x (Conv2d 3x3 16 -> 16, then InPlaceABN (``"iabn"``) or BatchNorm2d + LeakyReLU(inplace))."""
    layers = []
    for _ in range(depth):
        layers.append(nn.Conv2d(16, 16, 3, padding=1, bias=False))
        if norm == "iabn":
            layers.append(InPlaceABN(16))
        else:
            layers += [nn.BatchNorm2d(16), nn.LeakyReLU(0.01, inplace=True)]
    return nn.Sequential(*layers)


def damage_checkpoint(path, nbytes: int = 16) -> str:
    """Flips ``nbytes`` bytes inside the largest weight tensor stored in the checkpoint at ``path``.

    The file stays a loadable zip (torch does not verify tensor bytes), so only a content checksum can tell.

    Returns:
        The state-dict key of the damaged tensor.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    weights = ckpt["model"] if "model" in ckpt else ckpt
    key = max((k for k, v in weights.items() if v.is_floating_point()), key=lambda k: weights[k].numel())
    raw = weights[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    with open(path, "rb") as f:
        data = bytearray(f.read())
    at = data.find(raw)
    assert at >= 0, "tensor bytes not found in the file"
    n = min(nbytes, len(raw))
    data[at : at + n] = bytes(b ^ 0x5A for b in data[at : at + n])
    with open(path, "wb") as f:
        f.write(data)
    return key


def aot_recording_backend(partition: str) -> tuple:
    """(a torch.compile backend, the dict it fills with the AOT "fw" and "bw" graph modules): AOTAutograd with
    ``default_partition`` (``partition="default"``), ``min_cut_rematerialization_partition`` (``"min_cut"``),
    or as inductor partitions (``"inductor"``: its decompositions and its min-cut, which honours
    ``activation_memory_budget``), the graphs run as traced. The backward graph's non-tangent placeholders
    are what the step keeps."""
    import functools

    from functorch.compile import default_partition, make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def recorder(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    if partition == "inductor":
        import torch._inductor.lowering  # noqa: F401 - inductor's decompositions consult it
        from torch._inductor.decomposition import select_decomp_table

        partition_fn = functools.partial(min_cut_rematerialization_partition, compiler="inductor")
        return aot_autograd(
            fw_compiler=recorder("fw"),
            bw_compiler=recorder("bw"),
            partition_fn=partition_fn,
            decompositions=select_decomp_table(),
        ), graphs
    partition_fn = default_partition if partition == "default" else min_cut_rematerialization_partition
    return aot_autograd(fw_compiler=recorder("fw"), bw_compiler=recorder("bw"), partition_fn=partition_fn), graphs
