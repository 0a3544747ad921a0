"""DenseNet with a choice of normalisation (BatchNorm+ReLU or In-Place ABN) and memory strategy.

Memory modes:
    * ``"naive"``: every dense layer concatenates the feature list afresh and keeps its own copy of the
      concatenation (and its normalised version) for backward: quadratic memory per block.
    * ``"checkpoint"``: the bottleneck ``concat -> norm1 -> conv1x1`` is wrapped in
      ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (torchvision's ``memory_efficient``);
      it is recomputed in backward. Known pitfall: the recompute updates the running statistics of norm1
      a second time per step (``num_batches_tracked`` advances by 2).
    * ``"efficient"`` (``norm="iabn"`` only): the bottleneck ``concat -> In-Place ABN -> conv1x1`` is one
      autograd Function (:mod:`densenet.efficient`) that keeps only the input features and the per-channel
      batch statistics; the concatenation lives in one storage shared by the block's layers, and backward
      rebuilds the normalised concatenation there from the statistics (no reduction, no second
      running-stat update). Saved activations per block become linear in the number of layers.

In-place safety with ``norm="iabn"``: every In-Place ABN input is a tensor that nothing else needs (a
``torch.cat`` output into fresh or block-shared scratch storage, or a conv output), so overwriting it is safe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from inplace_abn import InPlaceABN

from .efficient import SharedBuffer, efficient_bottleneck

__all__ = [
    "DenseNet",
    "densenet_bc",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "NORMS",
    "MEMORY_MODES",
]

NORMS: tuple[str, ...] = ("bn", "iabn")
MEMORY_MODES: tuple[str, ...] = ("naive", "checkpoint", "efficient")


def _check_options(norm: str, memory: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    if memory == "efficient" and norm != "iabn":
        raise ValueError(
            'memory="efficient" requires norm="iabn" (the shared buffer is normalised in place and rebuilt from '
            'the saved statistics in backward); use memory="checkpoint" for norm="bn"'
        )


def make_norm(num_features: int, norm: str) -> nn.Module:
    """Normalisation + activation block.

    Args:
        num_features: C, the number of channels.
        norm: ``"bn"`` (``nn.BatchNorm2d`` + ``nn.ReLU(inplace=True)``) or ``"iabn"``
            (``InPlaceABN`` with leaky_relu 0.01, which overwrites its input).

    Returns:
        A module mapping (N, C, H, W) -> (N, C, H, W).
    """
    if norm == "bn":
        return nn.Sequential(nn.BatchNorm2d(num_features), nn.ReLU(inplace=True))
    if norm == "iabn":
        return InPlaceABN(num_features, activation="leaky_relu", activation_param=0.01)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class _DenseLayer(nn.Module):
    """Bottleneck dense layer: cat -> norm1 -> conv1x1 (bn_size*k) -> norm2 -> conv3x3 (k) -> dropout.

    Args:
        num_input_features: C_in, the total channels of the incoming feature list.
        growth_rate: k, output channels.
        bn_size: Bottleneck width multiplier.
        drop_rate: Dropout probability after the 3x3 conv (kept outside any recomputed region).
        norm: ``"bn"`` or ``"iabn"``.
        memory: ``"naive"``, ``"checkpoint"`` or ``"efficient"``.

    Shape:
        Input: a list of (N, C_i, H, W) tensors with sum(C_i) = C_in. Output: (N, k, H, W).
    """

    def __init__(
        self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float, norm: str, memory: str
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(num_input_features, norm)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = make_norm(bn_size * growth_rate, norm)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory = memory
        # The concatenation storage of memory="efficient"; _DenseBlock gives all its layers one instance.
        self.shared = SharedBuffer()

    def bottleneck(self, *features: Tensor) -> Tensor:
        """(N, C_in, H, W) as a list of parts -> (N, bn_size*k, H, W). The cat is fresh, so norm1 may overwrite it."""
        return self.conv1(self.norm1(torch.cat(features, 1)))

    def forward(self, features: list[Tensor]) -> Tensor:
        if self.memory == "efficient":
            # One autograd Function: saves the features and per-channel statistics, recomputes the rest.
            out = efficient_bottleneck(self.norm1, self.conv1, *features, shared=self.shared)
        elif self.memory == "checkpoint" and torch.is_grad_enabled() and any(f.requires_grad for f in features):
            # Each feature is its own argument (never one list): non-reentrant checkpoint keeps the gradients.
            out = cp.checkpoint(self.bottleneck, *features, use_reentrant=False)
        else:
            out = self.bottleneck(*features)
        out = self.conv2(self.norm2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; the features are kept in a list, concatenated per layer.

    Shape:
        Input (N, C, H, W). Output (N, C + num_layers*k, H, W).
    """

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        norm: str,
        memory: str,
    ) -> None:
        super().__init__()
        shared = SharedBuffer()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, norm, memory)
            layer.shared = shared
            self[f"denselayer{i + 1}"] = layer

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return features


class _Transition(nn.Module):
    """cat -> norm -> conv1x1 -> avgpool 2.

    Shape:
        Input: list of (N, C_i, H, W), sum(C_i) = C_in. Output (N, C_out, H // 2, W // 2).
    """

    def __init__(self, num_input_features: int, num_output_features: int, norm: str) -> None:
        super().__init__()
        self.norm = make_norm(num_input_features, norm)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.pool(self.conv(self.norm(torch.cat(features, 1))))


class DenseNet(nn.Module):
    """DenseNet(-BC) with selectable normalisation and memory strategy.

    Args:
        growth_rate: k, channels added per dense layer.
        block_config: Number of layers in each dense block.
        compression: Transition output channels = floor(compression * input channels).
        num_init_features: Channels of the stem output.
        bn_size: Bottleneck width multiplier (1x1 conv outputs bn_size*k channels).
        drop_rate: Dropout after each dense layer's 3x3 conv.
        num_classes: Output logits.
        small_inputs: True: stem = one 3x3 conv (CIFAR). False: 7x7 stride-2 conv + norm + 3x3 stride-2
            max-pool (ImageNet).
        norm: ``"bn"`` (BatchNorm2d + ReLU) or ``"iabn"`` (In-Place ABN, leaky_relu 0.01).
        memory: ``"naive"``, ``"checkpoint"`` or ``"efficient"`` (the last requires ``norm="iabn"``).

    Shape:
        Input (N, 3, H, W). Output (N, num_classes).
    """

    def __init__(
        self,
        growth_rate: int = 12,
        block_config: Sequence[int] = (16, 16, 16),
        compression: float = 0.5,
        num_init_features: int = 24,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 10,
        small_inputs: bool = True,
        norm: str = "iabn",
        memory: str = "naive",
    ) -> None:
        super().__init__()
        _check_options(norm, memory)
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")
        self.norm_type = norm
        self.memory = memory
        stem: dict[str, nn.Module] = {}
        if small_inputs:
            stem["conv0"] = nn.Conv2d(3, num_init_features, kernel_size=3, padding=1, bias=False)
        else:
            stem["conv0"] = nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)
            stem["norm0"] = make_norm(num_init_features, norm)  # the conv output is fresh: in place is safe
            stem["pool0"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stem = nn.Sequential(*stem.values())

        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.blocks.append(_DenseBlock(num_layers, num_features, growth_rate, bn_size, drop_rate, norm, memory))
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(num_features * compression)
                self.transitions.append(_Transition(num_features, out_features, norm))
                num_features = out_features
        self.final_norm = make_norm(num_features, norm)
        self.classifier = nn.Linear(num_features, num_classes)
        self.num_features = num_features

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.BatchNorm2d, InPlaceABN)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, num_classes) logits."""
        out = self.stem(x)
        for i, block in enumerate(self.blocks):
            features = block(out)
            if i < len(self.transitions):
                out = self.transitions[i](features)
            else:
                out = torch.cat(features, 1)  # fresh: the final norm may overwrite it
        out = self.final_norm(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.classifier(out)


def densenet_bc(depth: int, growth_rate: int = 12, **kw) -> DenseNet:
    """CIFAR DenseNet-BC: depth = 6n+4 -> blocks (n, n, n), 2k stem channels, bn_size 4, compression 0.5.

    Args:
        depth: 6n+4 with n >= 1 (40, 100, 250, ...).
        growth_rate: k.
        **kw: Other :class:`DenseNet` arguments (norm, memory, num_classes, drop_rate, ...).

    Returns:
        A model mapping (N, 3, H, W) -> (N, num_classes).
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n+4 with n >= 1, got {depth!r}")
    n = (depth - 4) // 6
    kw.setdefault("num_init_features", 2 * growth_rate)
    kw.setdefault("bn_size", 4)
    kw.setdefault("compression", 0.5)
    kw.setdefault("small_inputs", True)
    return DenseNet(growth_rate=growth_rate, block_config=(n, n, n), **kw)


def _imagenet(block_config: tuple[int, ...], growth_rate: int, num_init_features: int, kw: dict) -> DenseNet:
    kw.setdefault("growth_rate", growth_rate)
    kw.setdefault("num_init_features", num_init_features)
    kw.setdefault("small_inputs", False)
    kw.setdefault("num_classes", 1000)
    kw.setdefault("compression", 0.5)
    kw.setdefault("bn_size", 4)
    return DenseNet(block_config=block_config, **kw)


def densenet121(**kw) -> DenseNet:
    """DenseNet-121 (k=32, blocks (6, 12, 24, 16)): (N, 3, 224, 224) -> (N, 1000). 7,978,856 params (bn)."""
    return _imagenet((6, 12, 24, 16), 32, 64, kw)


def densenet161(**kw) -> DenseNet:
    """DenseNet-161 (k=48, 96 stem channels, blocks (6, 12, 36, 24)): 28,681,000 params (bn)."""
    return _imagenet((6, 12, 36, 24), 48, 96, kw)


def densenet169(**kw) -> DenseNet:
    """DenseNet-169 (k=32, blocks (6, 12, 32, 32)): 14,149,480 params (bn)."""
    return _imagenet((6, 12, 32, 32), 32, 64, kw)


def densenet201(**kw) -> DenseNet:
    """DenseNet-201 (k=32, blocks (6, 12, 48, 32)): 20,013,928 params (bn)."""
    return _imagenet((6, 12, 48, 32), 32, 64, kw)


def densenet264(**kw) -> DenseNet:
    """DenseNet-264 (k=32, blocks (6, 12, 64, 48)): 33,337,704 params (bn); growth_rate=48,
    num_init_features=96 gives 72,686,632 (the 72.7M of the paper)."""
    return _imagenet((6, 12, 64, 48), 32, 64, kw)
