"""Exact saved-for-backward accounting: In-Place ABN keeps one activation per layer, BN + act two."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from inplace_abn import InPlaceABN
from inplace_abn.memory import parameters_of, saved_tensor_bytes

from helpers import ACT_BYTES, MEMORY_SHAPE, VEC_BYTES, norm_stack, saved_bytes

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
