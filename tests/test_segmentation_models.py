"""segmentation models: shapes, bn == iabn in float64, layer counts, in-place safety, saved memory, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inplace_abn
from inplace_abn import InPlaceABN, InPlaceABNSync
from inplace_abn.memory import parameters_of, saved_tensor_bytes
from segmentation import ARCHS, NORMS, build_model, norm_act
from segmentation.models import Bottleneck, MaxPool2d
from segmentation.norm import bn_weight_from_iabn

WIDTH = 0.125  # 1/8 of every channel count: the real layouts, CPU-cheap


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    """BatchNorm2d / In-Place ABN layers in registration order."""
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, InPlaceABN, InPlaceABNSync))]


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Positive norm weights, random biases and running statistics (so eval mode is not trivial)."""
    with torch.no_grad():
        for m in _norm_layers(model):
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5)
        for m in _convs(model):
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype) * 0.1)


def _copy_iabn_to_bn(iabn: nn.Module, bn: nn.Module) -> None:
    """Gives ``bn`` the function of ``iabn``: same convs, BatchNorm weight = |w| + eps."""
    src, dst = _norm_layers(iabn), _norm_layers(bn)
    assert len(src) == len(dst) and all(isinstance(m, nn.BatchNorm2d) for m in dst)
    with torch.no_grad():
        for s, d in zip(src, dst):
            d.weight.copy_(bn_weight_from_iabn(s.weight, s.eps))
            d.bias.copy_(s.bias)
            d.running_mean.copy_(s.running_mean)
            d.running_var.copy_(s.running_var)
        for s, d in zip(_convs(iabn), _convs(bn)):
            d.weight.copy_(s.weight)
            if s.bias is not None:
                d.bias.copy_(s.bias)


def _step(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Training forward + backward of a fixed random projection of the logits; (out, dx, conv/norm grads)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # same Dropout2d masks in both models
    out = model(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * weight).sum().backward()
    grads = [p.grad for m in _convs(model) + _norm_layers(model) for p in (m.weight, m.bias) if p is not None]
    return out.detach(), x.grad, grads


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_shapes_and_backward(arch: str, output_stride: int) -> None:
    model = build_model(arch, 5, norm="iabn", output_stride=output_stride, width=WIDTH).train()
    # 64 x 64: the backbone feature map is exactly 64 / output_stride
    x = torch.randn(2, 3, 64, 64)
    feats = model.backbone(x)
    assert feats.shape == (2, model.backbone.out_channels, 64 // output_stride, 64 // output_stride)
    # odd size: logits are upsampled to the input size; backward runs (no in-place errors)
    x = torch.randn(1, 3, 65, 97, requires_grad=True)
    out = model(x)
    assert out.shape == (1, 5, 65, 97)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 33, 47)).shape == (2, 5, 33, 47)


def test_real_width_channels() -> None:
    """Width 1.0 is the published layout (checked on the meta device: nothing allocated)."""
    with torch.device("meta"):
        wrn = build_model("wrn38", 19, norm="bn")
        r50 = build_model("resnet50", 19, norm="bn")
    assert wrn.backbone.out_channels == 4096 and r50.backbone.out_channels == 2048
    assert wrn.head.classifier.in_channels == 256 and wrn.head.classifier.out_channels == 19
    assert [len(getattr(wrn.backbone, f"mod{i}")) for i in range(2, 8)] == [3, 3, 6, 3, 1, 1]
    assert [len(getattr(r50.backbone, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    # parameter counts are independent of the norm
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        assert count(build_model("wrn38", 19, norm="iabn")) == count(wrn)


# ------------------------------------------------------------------------------------ bn == iabn exactly


@pytest.mark.parametrize(
    "arch,output_stride", [("wrn38", 16), ("wrn38", 8), ("resnet50", 16), ("resnet50", 8), ("resnet101", 16)]
)
def test_bn_and_iabn_match_in_float64(arch: str, output_stride: int) -> None:
    _check_bn_equals_iabn(arch, output_stride)


@pytest.mark.parametrize("arch", ["wrn38", "resnet50"])
def test_bn_and_iabn_match_on_the_python_backend(arch: str) -> None:
    """The same with the pure-PyTorch path (what runs where the C++ extension is not built)."""
    with inplace_abn.use_backend("python"):
        _check_bn_equals_iabn(arch, 16)


def _check_bn_equals_iabn(arch: str, output_stride: int) -> None:
    gen = torch.Generator().manual_seed(1)
    iabn = build_model(arch, 4, norm="iabn", output_stride=output_stride, width=WIDTH).double().train()
    bn = build_model(arch, 4, norm="bn", output_stride=output_stride, width=WIDTH).double().train()
    _randomize(iabn, gen)
    _copy_iabn_to_bn(iabn, bn)
    x = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64)

    out_i, dx_i, g_i = _step(iabn, x, seed=3)
    out_b, dx_b, g_b = _step(bn, x, seed=3)
    torch.testing.assert_close(out_i, out_b)
    torch.testing.assert_close(dx_i, dx_b)
    assert len(g_i) == len(g_b)
    for a, b in zip(g_i, g_b):  # weights are positive: d|w|/dw = 1
        torch.testing.assert_close(a, b)
    for s, d in zip(_norm_layers(iabn), _norm_layers(bn)):  # running statistics moved the same way
        torch.testing.assert_close(s.running_mean, d.running_mean)
        torch.testing.assert_close(s.running_var, d.running_var)

    iabn.eval(), bn.eval()
    with torch.no_grad():
        torch.testing.assert_close(iabn(x), bn(x))


# ------------------------------------------------------------------------------------------ layer counts


# (norm layers with leaky ReLU, norm layers with identity activation) of the real architectures:
# WRN-38: 15 basic blocks x 2 + 2 bottlenecks x 3 + bn_out = 37, ResNet: stem + 3 per block (the last
# identity) + 4 projections; DeepLabV3 head: 4 ASPP branches + projection + 3x3 conv = 6.
EXPECTED_NORMS = {"wrn38": (37 + 6, 0), "resnet50": (1 + 16 * 2 + 6, 16 + 4), "resnet101": (1 + 33 * 2 + 6, 33 + 4)}
# In the in-place modes every bottleneck's bn3 is the fused act(BN + residual): leaky_relu, not identity.
EXPECTED_INPLACE = {"wrn38": (37 + 6, 0), "resnet50": (1 + 16 * 3 + 6, 4), "resnet101": (1 + 33 * 3 + 6, 4)}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_norm_activation_pair_uses_the_chosen_layer(arch: str) -> None:
    with torch.device("meta"):
        models = {norm: build_model(arch, 3, norm=norm) for norm in NORMS}
    bn = models["bn"]
    leaky = sum(
        isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.BatchNorm2d)
        and isinstance(m[1], nn.LeakyReLU) and m[1].inplace
        for m in bn.modules()
    )  # fmt: skip
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    assert (leaky, n_bn - leaky) == EXPECTED_NORMS[arch]
    for norm, layer in (("iabn", InPlaceABN), ("iabn_sync", InPlaceABNSync)):
        model = models[norm]
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        layers = [m for m in model.modules() if isinstance(m, (InPlaceABN, InPlaceABNSync))]
        assert all(type(m) is layer for m in layers)
        acts = [m.activation for m in layers]
        assert (acts.count("leaky_relu"), acts.count("identity")) == EXPECTED_INPLACE[arch]
        blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
        assert all(b._fused and b.bn3.activation == "leaky_relu" and not hasattr(b, "act") for b in blocks)
        assert all(m.activation_param == 0.01 for m in layers if m.activation == "leaky_relu")


def test_iabn_sync_runs_on_one_process(monkeypatch) -> None:
    # The layer warns once per process: re-arm it, whichever test happened to trigger it first.
    monkeypatch.setattr(inplace_abn.sync, "_warned_no_distributed", False)
    model = build_model("resnet50", 3, norm="iabn_sync", width=WIDTH)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="not initialised"):
        model(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_batch_of_one_trains() -> None:
    """The image-pooling branch has no norm: N=1 works in training mode for every norm, and the two norms
    compute the same training step (float64, BatchNorm weight = |w| + eps): output, dx, every conv / norm
    gradient, the running statistics; every norm layer counts one batch."""
    gen = torch.Generator().manual_seed(2)
    iabn = build_model("wrn38", 3, norm="iabn", width=WIDTH).double().train()
    bn = build_model("wrn38", 3, norm="bn", width=WIDTH).double().train()
    _randomize(iabn, gen)
    _copy_iabn_to_bn(iabn, bn)
    x = torch.randn(1, 3, 48, 48, generator=gen, dtype=torch.float64)
    out_i, dx_i, g_i = _step(iabn, x, seed=5)
    out_b, dx_b, g_b = _step(bn, x, seed=5)
    assert out_i.shape == (1, 3, 48, 48) and torch.isfinite(out_i).all()
    torch.testing.assert_close(out_i, out_b)
    torch.testing.assert_close(dx_i, dx_b)
    assert len(g_i) == len(g_b) > 0
    for a, b in zip(g_i, g_b):
        torch.testing.assert_close(a, b)
    pool_grad = iabn.head.aspp.pool_conv.weight.grad
    assert pool_grad is not None and pool_grad.abs().sum() > 0  # the N=1 image-pooling branch is trained
    for s_, d in zip(_norm_layers(iabn), _norm_layers(bn)):
        torch.testing.assert_close(s_.running_mean, d.running_mean)
        torch.testing.assert_close(s_.running_var, d.running_var)
        assert int(s_.num_batches_tracked) == int(d.num_batches_tracked) == 1


# -------------------------------------------------------------------------------------------- memory


def _saved(model: nn.Module, shape: tuple[int, ...]) -> int:
    x = torch.empty(*shape, device="meta", requires_grad=True)
    total, _, _ = saved_tensor_bytes(lambda: model(x), exclude=parameters_of(model) + [x])
    return total


def test_saved_bytes_wrn38_iabn_at_most_055_of_bn() -> None:
    with torch.device("meta"):
        bn = build_model("wrn38", 19, norm="bn", output_stride=16).train()
        iabn = build_model("wrn38", 19, norm="iabn", output_stride=16).train()
        r_bn = build_model("resnet50", 19, norm="bn", output_stride=16).train()
        r_iabn = build_model("resnet50", 19, norm="iabn", output_stride=16).train()
    shape = (2, 3, 256, 256)
    ratio = _saved(iabn, shape) / _saved(bn, shape)
    assert ratio <= 0.55, ratio
    # post-activation ResNet: bn3 + residual add + activation is one fused layer per bottleneck (issue 14's
    # target is <= 0.60 at 2x3x512x512; measured 0.5495 there and at this size, the ratio is size-free)
    r_ratio = _saved(r_iabn, shape) / _saved(r_bn, shape)
    assert r_ratio <= 0.55, r_ratio


def test_meta_count_equals_real_count() -> None:
    """The meta-device count is the count of a real CPU forward."""
    for norm in ("bn", "iabn"):
        torch.manual_seed(0)
        real = build_model("wrn38", 3, norm=norm, width=WIDTH)
        with torch.device("meta"):
            meta = build_model("wrn38", 3, norm=norm, width=WIDTH)
        x = torch.randn(2, 3, 64, 64, requires_grad=True)
        total, _, _ = saved_tensor_bytes(lambda m=real, x=x: m(x), exclude=parameters_of(real) + [x])
        assert total == _saved(meta, (2, 3, 64, 64))


def test_maxpool_matches_torch_and_saves_int32_indices() -> None:
    pool = MaxPool2d(3, 2, 1)
    x = torch.randint(0, 4, (2, 3, 11, 14), dtype=torch.float64)  # many ties
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    total, out, _ = saved_tensor_bytes(lambda: pool(a * 1))
    ref = F.max_pool2d(b, 3, 2, 1)
    torch.testing.assert_close(out, ref)
    g = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(a.grad, b.grad)
    assert total == out.numel() * 4  # only the int32 argmax indices


# -------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(arch="vgg16"), r"arch must be one of \('wrn38', 'resnet50', 'resnet101'\), got 'vgg16'"),
        (dict(norm="gn"), r"norm must be one of \('bn', 'iabn', 'iabn_sync'\), got 'gn'"),
        (dict(output_stride=32), r"output_stride must be one of \(8, 16\), got 32"),
        (dict(output_stride=True), r"output_stride must be one of \(8, 16\), got True"),
        (dict(num_classes=0), r"num_classes must be an int >= 1, got 0"),
        (dict(num_classes=2.0), r"num_classes must be an int >= 1, got 2.0"),
        (dict(width=0), r"width must be a finite number > 0 .*got 0"),
        (dict(width=-0.5), r"width must be a finite number > 0 .*got -0.5"),
        (dict(width=math.nan), r"width must be a finite number > 0 .*got nan"),
    ],
)
def test_build_model_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = dict(arch="wrn38", num_classes=3, norm="iabn", output_stride=16, width=WIDTH)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_model(**args)


def test_norm_act_layers_and_errors() -> None:
    bn = norm_act("bn", 4)
    assert isinstance(bn[0], nn.BatchNorm2d) and isinstance(bn[1], nn.LeakyReLU) and bn[1].inplace
    assert bn[1].negative_slope == 0.01
    assert type(norm_act("bn", 4, activation="identity")) is nn.BatchNorm2d
    assert type(norm_act("iabn", 4)) is InPlaceABN and type(norm_act("iabn_sync", 4)) is InPlaceABNSync
    assert norm_act("iabn", 4, activation="identity").activation == "identity"
    with pytest.raises(ValueError, match=r"norm must be one of .*got 'abn'"):
        norm_act("abn", 4)
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'relu'"):
        norm_act("iabn", 4, activation="relu")
    with pytest.raises(ValueError, match=r"channels must be a positive int, got 0"):
        norm_act("bn", 0)


def test_model_rejects_bad_input_shape() -> None:
    model = build_model("resnet50", 3, width=WIDTH)
    with pytest.raises(ValueError, match=r"input must have shape \(N, 3, H, W\), got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
