"""RecomputeMaxPool2d / functions.max_pool2d: nn.MaxPool2d's outputs and gradients (bit for bit), keeping only
the input for backward (exact byte counts), swapped in by convert_model and back by to_batchnorm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from helpers import aot_recording_backend
from torch.testing import assert_close

from inplace_abn import InPlaceABN, RecomputeMaxPool2d, convert_model, to_batchnorm
from inplace_abn.functions import max_pool2d
from inplace_abn.memory import parameters_of, saved_tensor_bytes

# (input shape, constructor arguments): overlapping windows (resnet's stem), odd sizes, padding, dilation,
# ceil_mode, rectangular kernels and strides, stride=None, an unbatched (C, H, W) input.
CASES = [
    ((2, 3, 11, 9), dict(kernel_size=3, stride=2, padding=1)),
    ((1, 4, 7, 13), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=2, ceil_mode=True)),
    ((3, 2, 8, 8), dict(kernel_size=2)),
    ((2, 5, 6, 5), dict(kernel_size=3, stride=1, padding=1, ceil_mode=True)),
    ((3, 10, 10), dict(kernel_size=3, stride=2, padding=1)),
]
# Exact: the same max and the same backward op (aten.max_pool2d_with_indices_backward) on the same indices.
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,kwargs", CASES, ids=[str(i) for i in range(len(CASES))])
def test_matches_nn_max_pool_bit_for_bit(shape, kwargs, dtype, channels_last):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs a 4-d input")
    torch.manual_seed(0)
    x0 = torch.randn(shape).to(dtype)
    x0[..., 0, :2] = x0[..., 1, :2]  # ties: both pick the first maximum of a window
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(nn.MaxPool2d(**kwargs)(x0).shape).to(dtype)
    results = []
    for pool in (nn.MaxPool2d(**kwargs), RecomputeMaxPool2d(**kwargs)):
        x = x0.clone().requires_grad_()
        y = pool(x)
        y.backward(dy)
        results.append((y.detach(), x.grad))
    (y_ref, dx_ref), (y, dx) = results
    assert_close(y, y_ref, rtol=0, atol=0)
    assert_close(dx, dx_ref, rtol=0, atol=0)


def test_gradcheck():
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: max_pool2d(t, 3, 2, 1), (x,))
    assert torch.autograd.gradgradcheck(lambda t: max_pool2d(t, (2, 3), 1, 0, 2, True), (x,)) is True


def _stem(pool: nn.Module, with_iabn: bool) -> nn.Sequential:
    torch.manual_seed(0)
    norm = InPlaceABN(8) if with_iabn else nn.Identity()
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, pool, nn.Conv2d(8, 8, 3))


@pytest.mark.parametrize("with_iabn", [True, False], ids=["after_inplace_abn", "after_conv"])
def test_keeps_only_its_input(with_iabn):
    """Exact saved bytes: without the int64 indices (8 bytes per output element), nothing else changes. After an
    In-Place ABN layer the pool's input is that layer's kept output, so the pool adds nothing; after a conv
    (which does not keep its output) the pool keeps the input, as nn.MaxPool2d also does."""
    x = torch.randn(2, 3, 16, 16)
    kept = {}
    for pool in (nn.MaxPool2d(3, 2, 1), RecomputeMaxPool2d(3, 2, 1)):
        model = _stem(pool, with_iabn)
        total, loss, per_storage = saved_tensor_bytes(lambda m=model: m(x).sum(), exclude=parameters_of(model) + [x])
        loss.backward()
        kept[type(pool)] = (total, len(per_storage))
    indices_bytes = 2 * 8 * 8 * 8 * 8  # (2, 8, 8, 8) int64
    stock, ours = kept[nn.MaxPool2d], kept[RecomputeMaxPool2d]
    assert ours == (stock[0] - indices_bytes, stock[1] - 1), (stock, ours)


def test_input_modified_before_backward_raises():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    inp = x * 1.0
    y = max_pool2d(inp, 2)
    inp.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_no_grad_and_eval_are_plain_max_pool():
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        y = RecomputeMaxPool2d(2)(x.requires_grad_())
    assert y.grad_fn is None
    assert_close(y, nn.functional.max_pool2d(x, 2), rtol=0, atol=0)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_matches_eager(compiler):
    torch._dynamo.reset()
    model = _stem(RecomputeMaxPool2d(3, 2, 1), with_iabn=False).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    eager = copy.deepcopy(model)
    eager(x).square().sum().backward()
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    compiled(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)
    torch._dynamo.reset()


def test_compiled_graph_keeps_no_indices():
    """The compiled backward's inputs (what the step keeps) hold no integer tensor: the argmax is recomputed."""
    torch._dynamo.reset()
    backend, graphs = aot_recording_backend("default")
    model = _stem(RecomputeMaxPool2d(3, 2, 1), with_iabn=False)
    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(2, 3, 16, 16)).sum().backward()
    kept = [n.meta["val"] for n in graphs["bw"].graph.find_nodes(op="placeholder") if "tangents" not in n.name]
    assert kept and not any(t.dtype in (torch.int64, torch.int32) for t in kept), [t.dtype for t in kept]
    torch._dynamo.reset()


class _Stem(nn.Module):
    """torchvision's stem: conv -> BN -> ReLU -> max-pool, then a block's conv; a shared pool used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.indices_pool = nn.MaxPool2d(2, return_indices=True)  # returns indices: left alone
        self.conv2 = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        y = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        y, _ = self.indices_pool(y)
        return self.conv2(self.maxpool(y))


def test_convert_model_swaps_and_to_batchnorm_restores():
    torch.manual_seed(0)
    model = _Stem().eval()
    converted, report = convert_model(model, return_report=True)
    assert report.max_pools == ["maxpool"]
    assert "RecomputeMaxPool2d): 1" in report.summary()
    assert type(converted.maxpool) is RecomputeMaxPool2d and type(converted.indices_pool) is nn.MaxPool2d
    assert converted.state_dict().keys() == model.state_dict().keys()
    back = to_batchnorm(copy.deepcopy(converted))
    assert type(back.maxpool) is nn.MaxPool2d
    assert {k: v for k, v in vars(back.maxpool).items() if not k.startswith("_")} == {
        k: v for k, v in vars(model.maxpool).items() if not k.startswith("_")
    }
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(back(x), converted(x), rtol=1e-5, atol=1e-5)
    kept = convert_model(model, recompute_max_pool=False)
    assert type(kept.maxpool) is nn.MaxPool2d
