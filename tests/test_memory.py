"""Exact saved-for-backward accounting: In-Place ABN keeps one activation per layer, BN + act two."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import ACT_BYTES, MEMORY_SHAPE, VEC_BYTES, norm_stack, saved_bytes
from torch import nn

from inplace_abn import InPlaceABN
from inplace_abn.memory import parameters_of, saved_tensor_bytes

# Per-channel vectors a training layer keeps besides y: the variance, on both backends (the saved state of
# InPlaceABNFunction is the same for every backend and mode).
STATE_VECTORS = {"cpp": 1, "python": 1}


@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0)])
def test_inplace_abn_saves_one_activation(backend, activation, param):
    """Exactly y plus the backend's per-channel vectors (STATE_VECTORS); weight/bias are parameters."""
    expected = ACT_BYTES + STATE_VECTORS[backend] * VEC_BYTES
    assert saved_bytes(InPlaceABN(16, activation=activation, activation_param=param)) == expected


def test_batchnorm_leaky_relu_inplace_saves_two_activations():
    """The baseline: BN keeps its input, LeakyReLU(inplace) its output (2 activations + mean/invstd).

    Parameters and buffers (running stats) are resident anyway and not counted, for every variant.
    """
    pair = nn.Sequential(nn.BatchNorm2d(16), nn.LeakyReLU(0.01, inplace=True))
    assert saved_bytes(pair) == 2 * ACT_BYTES + 2 * VEC_BYTES


def test_batchnorm_leaky_relu_saves_two_activations():
    pair = nn.Sequential(nn.BatchNorm2d(16), nn.LeakyReLU(0.01))
    assert saved_bytes(pair) == 2 * ACT_BYTES + 2 * VEC_BYTES


def test_relu_layer_keeps_pre_activation(backend):
    """ReLU is not invertible: the layer keeps z as well (2 activations), as its warning says."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        layer = InPlaceABN(16, activation="relu")
    assert saved_bytes(layer) == 2 * ACT_BYTES + STATE_VECTORS[backend] * VEC_BYTES


def test_eval_mode_saves_one_activation(backend):
    """In eval the variance is the running_var buffer itself: only y is added."""
    layer = InPlaceABN(16).eval()
    assert saved_bytes(layer) == ACT_BYTES


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_conv_stack_saving(backend, device):
    """A conv -> norm/act stack: each conv keeps its input; In-Place ABN removes one activation per layer.

    conv_i saves its input (the previous layer's output, or the network input for i = 0). With
    In-Place ABN that input IS the saved y of the previous layer, so per layer: 1 activation; with
    BN + LeakyReLU(inplace): the conv output (saved by BN) and the activation output (saved by the
    activation and by the next conv): 2 activations. Counted on meta too, which needs the fake kernels.
    """
    depth = 5
    saved = {}
    for norm in ("iabn", "bn"):
        model = norm_stack(norm, depth).to(device)
        x = torch.randn(MEMORY_SHAPE, device=device)
        saved[norm], _, _ = saved_tensor_bytes(lambda: model(x), exclude=parameters_of(model))
    # the input x (saved by conv_0) + per layer: activations and per-channel vectors
    assert saved["iabn"] == ACT_BYTES + depth * (ACT_BYTES + STATE_VECTORS[backend] * VEC_BYTES)
    assert saved["bn"] == ACT_BYTES + depth * (2 * ACT_BYTES + 2 * VEC_BYTES)


# ---------------------------------------------------------------------------------------------------
# post-activation residual block (torchvision BasicBlock): conv -> norm -> act -> conv -> norm -> add -> act
# ---------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """A BasicBlock-like residual block in one of three norm variants:

    - ``"bn"``: BatchNorm2d + ReLU(inplace), ``out += identity``, ReLU(inplace) (torchvision);
    - ``"iabn"``: today's conversion: InPlaceABN(leaky_relu), and InPlaceABN(identity) before an out-of-place
      add (the in-place layer keeps its output, which an in-place add would overwrite), then
      LeakyReLU(inplace);
    - ``"fused"``: InPlaceABN(leaky_relu), and the fused ``InPlaceABN(leaky_relu)(x, residual)``.
    """

    def __init__(self, kind: str, c: int = 16):
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        if kind == "bn":
            self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
            self.act1, self.act2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        elif kind == "iabn":
            self.bn1, self.bn2 = InPlaceABN(c), InPlaceABN(c, activation="identity")
            self.act2 = nn.LeakyReLU(0.01, inplace=True)
        elif kind == "fused":
            self.bn1, self.bn2 = InPlaceABN(c), InPlaceABN(c)
        else:
            raise AssertionError(kind)

    def forward(self, x):
        if self.kind == "bn":
            out = self.act1(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += x
            return self.act2(out)
        out = self.conv2(self.bn1(self.conv1(x)))
        if self.kind == "fused":
            return self.bn2(out, x)
        return self.act2(self.bn2(out) + x)


def _block_saved(block: nn.Module, dtype=torch.float32, residual_grad: bool = True):
    """(activation bytes, other bytes) the block saves for backward on a fresh non-leaf input of MEMORY_SHAPE
    (parameters excluded). Activations: storages of exactly one activation of ``dtype``; others: the (C,)
    vectors, and the kept x_hat of a subset of the channels with its int64 channel indices."""
    block = block.to(dtype)
    base = torch.randn(MEMORY_SHAPE, dtype=dtype, requires_grad=residual_grad)
    _, out, storages = saved_tensor_bytes(lambda: block(base * 1.0), exclude=parameters_of(block) + [base])
    out.sum().backward()  # and the graph is usable
    act = ACT_BYTES * dtype.itemsize // 4
    acts = sum(n for n in storages.values() if n == act)
    return acts, sum(storages.values()) - acts


def test_residual_block_saved_activations(backend):
    """Each conv keeps its input; the fused layer keeps the residual by reference, and that is the block input
    conv1 keeps already:

    - BatchNorm2d + ReLU: x (conv1), c1 (bn1), a1 (relu1 and conv2), c2 (bn2), out (relu2): 5 activations,
      and bn1 / bn2 keep mean and invstd (4 vectors);
    - InPlaceABN identity before the add: x, y1 (bn1 and conv2), y2 (bn2), out (LeakyReLU): 4 activations,
      one variance per layer (STATE_VECTORS);
    - fused: x (conv1 and, by reference, bn2's residual), y1, y2 = out: 3 activations.

    The vectors of the fused block are checked in test_residual_block_saved_vectors.
    """
    saved = {kind: _block_saved(_Block(kind)) for kind in ("bn", "iabn", "fused")}
    assert saved["bn"] == (5 * ACT_BYTES, 4 * VEC_BYTES)
    assert saved["iabn"] == (4 * ACT_BYTES, 2 * STATE_VECTORS[backend] * VEC_BYTES)
    assert saved["fused"][0] == 3 * ACT_BYTES
    assert saved["iabn"][0] - saved["fused"][0] == ACT_BYTES  # the fusion saves exactly one activation


@pytest.mark.parametrize("residual_grad", [True, False], ids=["residual-grad", "residual-no-grad"])
def test_residual_block_saved_vectors(backend, residual_grad):
    """The fused block keeps one variance per In-Place layer, nothing else per channel. With a residual that
    requires grad, the layer's lossy-channel decision (absmax(residual), + |b|, / (|w| + eps)) must not be
    recorded by autograd: it once was, and every saved-tensor hook (this count, save_on_cpu) saw its (C,)
    divisor and, on "python", the vector_norm result."""
    assert _block_saved(_Block("fused"), residual_grad=residual_grad) == (
        3 * ACT_BYTES,
        2 * STATE_VECTORS[backend] * VEC_BYTES,
    )


INDEX_BYTES = 8  # one int64 channel index


@pytest.mark.parametrize("weights", ["zero", "one-zero-channel"])
def test_lossy_residual_call_keeps_x_hat_of_lossy_channels(backend, weights):
    """A zero-initialised last layer (gamma = eps) with a residual of unit scale: A = (max|r| + |b|) / eps
    ~ 4e5 > 16384 (float32) in the zero channel(s), so the layer keeps x_hat of those channels (and their
    int64 indices) for that call, besides y, the variance and the residual (the block input, counted once):
    every channel zero -> exactly one float32 activation more; one channel of 16 -> 1/16 of one."""
    normal = _Block("fused")
    lossy = _Block("fused")
    with torch.no_grad():
        for block in (normal, lossy):
            block.bn2.weight.fill_(1.0)
        if weights == "zero":
            lossy.bn2.weight.zero_()
        else:
            lossy.bn2.weight[3] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "keeps the normalised input", said once
        saved_normal, saved_lossy = _block_saved(normal), _block_saved(lossy)
    assert saved_normal[0] == 3 * ACT_BYTES
    if weights == "zero":
        assert saved_lossy == (saved_normal[0] + ACT_BYTES, saved_normal[1] + 16 * INDEX_BYTES)
    else:
        assert saved_lossy == (saved_normal[0], saved_normal[1] + ACT_BYTES // 16 + INDEX_BYTES)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_lossy_residual_call_half_keeps_xhat_in_half(backend, dtype):
    """In a half type the kept x_hat is in x's dtype: half a float32 activation (zero weight, float32
    parameters; the variance stays float32)."""
    layer = InPlaceABN(16)
    with torch.no_grad():
        layer.weight.zero_()
    base = torch.randn(MEMORY_SHAPE, requires_grad=True)
    r = torch.randn(MEMORY_SHAPE).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        total, _, _ = saved_tensor_bytes(
            lambda: layer((base * 1.0).to(dtype), r), exclude=parameters_of(layer) + [base]
        )
    half_act = ACT_BYTES // 2
    # y, the residual (kept by reference: nothing else keeps it here) and x_hat of all 16 channels, in the
    # half type, their indices, and the float32 variance
    assert total == 3 * half_act + 16 * INDEX_BYTES + STATE_VECTORS[backend] * VEC_BYTES
