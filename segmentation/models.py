"""Segmentation networks: dilated WiderResNet-38 A2 / ResNet-50 / ResNet-101 backbones + a DeepLabV3 head.

Every BatchNorm -> activation pair (backbone and head) is one :func:`segmentation.norm.norm_act` layer,
so ``norm="bn"`` and ``norm="iabn"`` build the same network with standard or In-Place ABN layers.

In-place safety (``norm="iabn"``/``"iabn_sync"``: the layer overwrites its input and keeps its output):

* WiderResNet (pre-activation): a block computes ``bn1(x)`` first. With a projection shortcut the
  shortcut is ``proj_conv(bn1(x))``; without one it is ``x`` itself, so ``x`` is copied (``x.clone()``)
  before ``bn1`` overwrites it (only in the in-place modes; BatchNorm leaves ``x`` intact). The residual
  addition ``out.add_(shortcut)`` writes into the last conv's output, which no layer saved.
* ResNet (post-activation): in the in-place modes the BatchNorm before the residual addition, the
  addition and the leaky ReLU are ONE fused layer, ``bn3(conv3_out, residual=shortcut)``
  (docs/math.md, "Residual fusion"): it overwrites the conv output and keeps that output plus the
  shortcut by reference (the block input, which ``conv1`` keeps anyway, or the projection's output),
  one activation less per block than an identity In-Place ABN before an out-of-place add. With
  ``norm="bn"`` the addition writes into the BatchNorm output (BatchNorm keeps its input, not its
  output), then the leaky ReLU runs in place. Both compute the same function, with the same state dict.
* DeepLabV3 head: every norm input is a conv output.

Max pooling (:class:`MaxPool2d`, both backbones, every ``norm``): an autograd Function that keeps only
the argmax indices, as int32, for backward. ``nn.MaxPool2d`` keeps its input *and* int64 indices; in
WiderResNet the input of the first pooling is the full-resolution stem conv output, which nothing
else keeps, so with In-Place ABN the two stock poolings would be about a quarter of everything saved
(WRN-38 + DeepLabV3, output stride 16: In-Place ABN / BatchNorm = 0.52 with this pooling, 0.58 with
``nn.MaxPool2d``; both norms use the same pooling). The backward scatters the gradient to the argmax
positions (the same sums as PyTorch's).

Image-pooling branch of ASPP: 1x1 conv *with bias* + leaky ReLU, no normalisation. Its input is a
(N, C, 1, 1) map, so batch statistics would be computed over N values per channel: training with one
image per process fails (BatchNorm needs more than one value per channel) and two images normalise to
+-1 whatever their content. The branch is (N, C, 1, 1), so leaving out the norm costs no memory, and it
is the same in every ``norm`` mode.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norm import NORMS, check_norm, norm_act, overwrites_input

__all__ = [
    "ARCHS",
    "NORMS",
    "MaxPool2d",
    "OUTPUT_STRIDES",
    "build_model",
    "SegmentationModel",
    "DeepLabV3Head",
    "ASPP",
    "WiderResNetA2",
    "IdentityResidualBlock",
    "ResNet",
    "Bottleneck",
]

#: Values of the ``arch`` argument.
ARCHS: tuple[str, ...] = ("wrn38", "resnet50", "resnet101")
#: Values of the ``output_stride`` argument.
OUTPUT_STRIDES: tuple[int, ...] = (8, 16)
#: Negative slope of every leaky ReLU (the paper's setting; > 0 keeps In-Place ABN invertible).
SLOPE = 0.01


def _scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, at least 1."""
    return max(1, int(channels * width))


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class _MaxPool2dFunction(torch.autograd.Function):
    """Max pooling whose backward needs only the argmax indices (kept as int32 when they fit)."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:  # type: ignore[override]
        out, indices = F.max_pool2d(x, kernel_size, stride, padding, return_indices=True)
        if x.size(-2) * x.size(-1) < 2**31:
            indices = indices.to(torch.int32)
        ctx.input_shape = x.shape
        ctx.save_for_backward(indices)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        grad_input = grad.new_zeros(n, c, h * w)
        # Overlapping windows may pick the same input position: scatter_add sums their gradients.
        grad_input.scatter_add_(2, indices.reshape(n, c, -1).long(), grad.reshape(n, c, -1))
        return grad_input.view(n, c, h, w), None, None, None


class MaxPool2d(nn.Module):
    """``nn.MaxPool2d(kernel_size, stride, padding)`` that keeps only int32 argmax indices for backward.

    Args:
        kernel_size, stride, padding: As ``nn.MaxPool2d`` (square).

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out), as ``nn.MaxPool2d``.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"MaxPool2d expects (N, C, H, W), got shape {tuple(x.shape)}")
        if not (torch.is_grad_enabled() and x.requires_grad):
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        return _MaxPool2dFunction.apply(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, saves=int32 indices"


# --------------------------------------------------------------------------------------------------------
# WiderResNet-38 A2
# --------------------------------------------------------------------------------------------------------


class IdentityResidualBlock(nn.Module):
    """Pre-activation residual block of WiderResNet: ``out = convs(bn1(x)) + shortcut``.

    Two 3x3 convs (``len(channels) == 2``) or a 1x1-3x3-1x1 bottleneck (``len(channels) == 3``), each
    conv but the first preceded by a norm-activation; optional Dropout2d before the last conv. The
    shortcut is a 1x1 ``proj_conv`` of ``bn1(x)`` when the block changes the channels or the stride,
    else ``x``.

    Args:
        in_channels: C_in.
        channels: Output channels of each conv; the last is C_out.
        norm: See :func:`segmentation.norm.norm_act`.
        stride: Stride of the first conv (and of the projection).
        dilation: Dilation of the 3x3 convs.
        dropout: Dropout2d probability before the last conv (0 = none).

    Shape:
        (N, C_in, H, W) -> (N, C_out, H / stride, W / stride). With an in-place ``norm`` the input is
        overwritten.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        norm: str,
        stride: int = 1,
        dilation: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(channels) not in (2, 3):
            raise ValueError(f"channels must have 2 or 3 entries, got {tuple(channels)!r}")
        self.bn1 = norm_act(norm, in_channels)
        layers: list[tuple[str, nn.Module]]
        if len(channels) == 2:
            layers = [
                ("conv1", _conv3x3(in_channels, channels[0], stride, dilation)),
                ("bn2", norm_act(norm, channels[0])),
                ("conv2", _conv3x3(channels[0], channels[1], 1, dilation)),
            ]
        else:
            layers = [
                ("conv1", _conv1x1(in_channels, channels[0], stride)),
                ("bn2", norm_act(norm, channels[0])),
                ("conv2", _conv3x3(channels[0], channels[1], 1, dilation)),
                ("bn3", norm_act(norm, channels[1])),
                ("conv3", _conv1x1(channels[1], channels[2])),
            ]
        if dropout > 0:
            layers.insert(len(layers) - 1, ("dropout", nn.Dropout2d(dropout)))
        self.convs = nn.Sequential(OrderedDict(layers))
        need_proj = stride != 1 or in_channels != channels[-1]
        self.proj_conv: nn.Conv2d | None = _conv1x1(in_channels, channels[-1], stride) if need_proj else None
        # bn1 overwrites x: an identity shortcut needs its own copy of x, taken before bn1 runs.
        self._copy_shortcut = overwrites_input(self.bn1)

    def forward(self, x: Tensor) -> Tensor:
        if self.proj_conv is not None:
            act = self.bn1(x)
            shortcut = self.proj_conv(act)
        else:
            shortcut = x.clone() if self._copy_shortcut else x
            act = self.bn1(x)
        out = self.convs(act)
        # `out` is the last conv's output: no layer saved it, so the addition may write into it.
        return out.add_(shortcut)


class WiderResNetA2(nn.Module):
    """WiderResNet-38 A2 (Wu, Shen, van den Hengel 2016), the segmentation backbone of the In-Place ABN
    paper, dilated to output stride 16 or 8, ending with a norm-activation.

    Layout: ``mod1`` 3x3 conv (64), max-pool, ``mod2`` (3 blocks, 128-128), max-pool, ``mod3`` (3 x
    256-256), ``mod4`` (6 x 512-512, stride 2), ``mod5`` (3 x 512-1024), ``mod6`` (1 bottleneck
    512-1024-2048, Dropout2d 0.3), ``mod7`` (1 bottleneck 1024-2048-4096, Dropout2d 0.5), ``bn_out``.
    Output stride 16: ``mod5`` has stride 2 and ``mod6``/``mod7`` dilation 2. Output stride 8: ``mod5``
    dilation 2, ``mod6``/``mod7`` dilation 4.

    Args:
        norm: See :func:`segmentation.norm.norm_act`.
        output_stride: 8 or 16.
        width: Channel multiplier (1.0 = the real network).

    Shape:
        (N, 3, H, W) -> (N, out_channels, ceil(H / os), ceil(W / os)).
    """

    STRUCTURE: tuple[int, ...] = (3, 3, 6, 3, 1, 1)
    CHANNELS: tuple[tuple[int, ...], ...] = (
        (128, 128), (256, 256), (512, 512), (512, 1024), (512, 1024, 2048), (1024, 2048, 4096),
    )  # fmt: skip
    DROPOUT: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.3, 0.5)

    def __init__(self, norm: str, output_stride: int = 16, width: float = 1.0) -> None:
        super().__init__()
        stem = _scaled(64, width)
        self.mod1 = nn.Sequential(OrderedDict([("conv1", _conv3x3(3, stem))]))
        # (stride of the first block, dilation) of mod2..mod7
        if output_stride == 16:
            plan = [(1, 1), (1, 1), (2, 1), (2, 1), (1, 2), (1, 2)]
        else:
            plan = [(1, 1), (1, 1), (2, 1), (1, 2), (1, 4), (1, 4)]
        cin = stem
        for i, (num, chans, drop, (stride, dilation)) in enumerate(
            zip(self.STRUCTURE, self.CHANNELS, self.DROPOUT, plan)
        ):
            chans = tuple(_scaled(c, width) for c in chans)
            blocks = []
            for b in range(num):
                block = IdentityResidualBlock(cin, chans, norm, stride if b == 0 else 1, dilation, drop)
                blocks.append((f"block{b + 1}", block))
                cin = chans[-1]
            if i < 2:
                self.add_module(f"pool{i + 2}", MaxPool2d(3, stride=2, padding=1))
            self.add_module(f"mod{i + 2}", nn.Sequential(OrderedDict(blocks)))
        self.bn_out = norm_act(norm, cin)
        self.out_channels = cin

    def forward(self, x: Tensor) -> Tensor:
        out = self.mod2(self.pool2(self.mod1(x)))
        out = self.mod3(self.pool3(out))
        out = self.mod7(self.mod6(self.mod5(self.mod4(out))))
        return self.bn_out(out)


# --------------------------------------------------------------------------------------------------------
# Dilated ResNet
# --------------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """Post-activation ResNet bottleneck (torchvision layout, stride on the 3x3 conv), leaky ReLU 0.01.

    ``act(bn3(conv3(bn1(conv1(x)) -> bn2(conv2(.)))) + shortcut)`` where ``bn1``, ``bn2`` are
    norm-activations and the projection's norm has identity activation. In the in-place modes ``bn3``
    is the fused layer ``act(BN(.) + shortcut)``; with ``norm="bn"`` it is a BatchNorm followed by the
    addition and ``act``.

    Args:
        in_channels: C_in.
        planes: Inner channels; C_out = 4 * planes.
        norm: See :func:`segmentation.norm.norm_act`.
        stride: Stride of the 3x3 conv.
        dilation: Dilation of the 3x3 conv.
        downsample: Use a projection shortcut (1x1 conv + norm).

    Shape:
        (N, C_in, H, W) -> (N, 4 * planes, H / stride, W / stride). The input is left intact.
    """

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, norm: str, stride: int = 1, dilation: int = 1, downsample: bool = False
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = norm_act(norm, planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_act(norm, planes)
        self.conv3 = _conv1x1(planes, out_channels)
        self.downsample: nn.Sequential | None = None
        if downsample:
            self.downsample = nn.Sequential(
                _conv1x1(in_channels, out_channels, stride), norm_act(norm, out_channels, activation="identity")
            )
        # The in-place layers take the residual add and the activation into bn3 (the same parameters and
        # buffers as the BatchNorm, so one state dict serves every norm).
        self._fused = overwrites_input(self.bn1)
        if self._fused:
            self.bn3 = norm_act(norm, out_channels, activation_param=SLOPE)
        else:
            self.bn3 = norm_act(norm, out_channels, activation="identity")
            self.act = nn.LeakyReLU(SLOPE, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        # x is the previous block's activation output: saved by autograd, read here, never overwritten
        # (the fused bn3 keeps it by reference, so it must stay unmodified until backward).
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        if self._fused:
            return self.bn3(self.conv3(out), residual=shortcut)
        return self.act(self.bn3(self.conv3(out)).add_(shortcut))


class ResNet(nn.Module):
    """Dilated ResNet-50/101 backbone (stem + layer1..layer4, no classifier).

    Output stride 16 dilates ``layer4``; 8 dilates ``layer3`` and ``layer4`` (torchvision's
    ``replace_stride_with_dilation``: the first block of a dilated stage keeps the previous dilation).

    Args:
        layers: Blocks per stage, (3, 4, 6, 3) for ResNet-50 or (3, 4, 23, 3) for ResNet-101.
        norm: See :func:`segmentation.norm.norm_act`.
        output_stride: 8 or 16.
        width: Channel multiplier (1.0 = the real network).

    Shape:
        (N, 3, H, W) -> (N, out_channels, ~H / os, ~W / os).
    """

    def __init__(self, layers: Sequence[int], norm: str, output_stride: int = 16, width: float = 1.0) -> None:
        super().__init__()
        stem = _scaled(64, width)
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_act(norm, stem)
        self.maxpool = MaxPool2d(3, stride=2, padding=1)
        dilate = (False, False, False, True) if output_stride == 16 else (False, False, True, True)
        cin, dilation = stem, 1
        for i, num in enumerate(layers):
            planes = _scaled(64 * 2**i, width)
            stride = 1 if i == 0 else 2
            previous = dilation
            if dilate[i]:
                dilation *= stride
                stride = 1
            blocks = []
            for b in range(num):
                first = b == 0
                blocks.append(
                    Bottleneck(
                        cin, planes, norm,
                        stride=stride if first else 1,
                        dilation=previous if first else dilation,
                        downsample=first and (stride != 1 or cin != planes * Bottleneck.expansion),
                    )
                )  # fmt: skip
                cin = planes * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = cin

    def forward(self, x: Tensor) -> Tensor:
        out = self.maxpool(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))


# --------------------------------------------------------------------------------------------------------
# DeepLabV3 head
# --------------------------------------------------------------------------------------------------------


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 conv, three dilated 3x3 convs and image pooling, concatenated
    and projected by a 1x1 conv; each conv followed by a norm-activation except the image-pooling conv
    (conv with bias + leaky ReLU, see the module docstring).

    Args:
        in_channels: C_in.
        channels: C, channels of each branch and of the output.
        rates: Dilations of the three 3x3 branches.
        norm: See :func:`segmentation.norm.norm_act`.

    Shape:
        (N, C_in, h, w) -> (N, C, h, w).
    """

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int], norm: str) -> None:
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(_conv1x1(in_channels, channels), norm_act(norm, channels))])
        for r in rates:
            self.branches.append(nn.Sequential(_conv3x3(in_channels, channels, dilation=r), norm_act(norm, channels)))
        self.pool_conv = nn.Conv2d(in_channels, channels, 1, bias=True)
        self.project = nn.Sequential(_conv1x1(channels * (len(rates) + 2), channels), norm_act(norm, channels))

    def forward(self, x: Tensor) -> Tensor:
        # The branches only read x (it is a norm-activation output, kept by that layer and by these convs).
        outs = [branch(x) for branch in self.branches]
        pool = F.leaky_relu(self.pool_conv(F.adaptive_avg_pool2d(x, 1)), SLOPE, inplace=True)
        outs.append(pool.expand(-1, -1, x.size(2), x.size(3)))
        return self.project(torch.cat(outs, 1))


class DeepLabV3Head(nn.Module):
    """ASPP -> 3x3 conv + norm-activation -> 1x1 classifier (with bias).

    Args:
        in_channels: Channels of the backbone output.
        num_classes: K.
        norm: See :func:`segmentation.norm.norm_act`.
        rates: ASPP dilations.
        channels: Channels of the head (256 in DeepLabV3).

    Shape:
        (N, C_in, h, w) -> (N, K, h, w).
    """

    def __init__(
        self, in_channels: int, num_classes: int, norm: str, rates: Sequence[int], channels: int = 256
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, channels, rates, norm)
        self.conv = _conv3x3(channels, channels)
        self.bn = norm_act(norm, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.bn(self.conv(self.aspp(x))))


class SegmentationModel(nn.Module):
    """Backbone + DeepLabV3 head; logits bilinearly upsampled to the input size.

    Attributes:
        backbone, head: The two parts (e.g. for a 10x learning rate on the head).
        arch, norm, output_stride, num_classes, width: The build arguments.

    Shape:
        (N, 3, H, W) float -> (N, num_classes, H, W) logits.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, **config: object) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        for k, v in config.items():
            setattr(self, k, v)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.size(1) != 3:
            raise ValueError(f"input must have shape (N, 3, H, W), got {tuple(x.shape)}")
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, leaky ReLU gain), zero biases, norm weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=SLOPE, mode="fan_out", nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d,)) or overwrites_input(m):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(
    arch: str, num_classes: int, norm: str = "iabn", output_stride: int = 16, width: float = 1.0
) -> SegmentationModel:
    """Builds ``arch`` + DeepLabV3 with every BatchNorm-activation pair of type ``norm``.

    Args:
        arch: ``"wrn38"`` (WiderResNet-38 A2), ``"resnet50"`` or ``"resnet101"`` (dilated).
        num_classes: K >= 1.
        norm: ``"bn"`` (BatchNorm2d + in-place leaky ReLU), ``"iabn"`` or ``"iabn_sync"``.
        output_stride: 16 (ASPP rates 6, 12, 18) or 8 (rates 12, 24, 36).
        width: Multiplier of every channel count, > 0 (1.0 is the real network; e.g. 0.125 for tests).

    Returns:
        A :class:`SegmentationModel` mapping (N, 3, H, W) -> (N, K, H, W), randomly initialised.

    Raises:
        ValueError: an argument out of range; the message names it, its value and the allowed values.
    """
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    check_norm(norm)
    if isinstance(output_stride, bool) or output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a finite number > 0 (1.0 = the real network), got {width!r}")
    if arch == "wrn38":
        backbone: nn.Module = WiderResNetA2(norm, output_stride, width)
    else:
        layers = (3, 4, 6, 3) if arch == "resnet50" else (3, 4, 23, 3)
        backbone = ResNet(layers, norm, output_stride, width)
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    head = DeepLabV3Head(backbone.out_channels, num_classes, norm, rates, _scaled(256, width))  # type: ignore[arg-type]
    model = SegmentationModel(
        backbone, head, arch=arch, norm=norm, output_stride=output_stride, num_classes=num_classes, width=float(width)
    )
    _init_weights(model)
    return model
