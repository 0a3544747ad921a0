"""Joint image/label transforms for semantic segmentation.

Every transform is a callable ``(image, label) -> (image, label)`` that applies the same geometric change
to both. Inputs may be PIL images / numpy arrays (converted with :class:`ToTensor` on the way in) or
tensors: image float (3, H, W) in [0, 1] (uint8 is scaled by 1/255), label integer (H, W). Outputs are
tensors: image float (3, H, W), label int64 (H, W).

All randomness comes from torch's global RNG, and every random transform draws the same number of values
on every call, so ``torch.manual_seed(s)`` makes a whole pipeline reproducible (and a resumed training
run, which restores the RNG state, sees exactly the same augmentations).

    >>> t = train_transform(crop_size=512)            # scale 0.5-2, pad+crop 512, flip, ImageNet normalise
    >>> image, label = t(pil_rgb_image, pil_label)     # (3, 512, 512) float, (512, 512) int64
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "ToTensor",
    "RandomScale",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Normalize",
    "train_transform",
    "eval_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Pair = tuple[Tensor, Tensor]


# ------------------------------------------------------------------------------------------------ helpers


def _image_to_tensor(image: Any) -> Tensor:
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = np.array(image, dtype=np.uint8)  # (H, W, 3)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy image must be (H, W, 3), got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a PIL image, numpy array or tensor, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensor must be (3, H, W), got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    if not image.is_floating_point():
        raise TypeError(f"image tensor must be float in [0, 1] or uint8, got {image.dtype}")
    return image


def _label_to_tensor(label: Any) -> Tensor:
    if isinstance(label, Image.Image):
        label = np.array(label)
    if isinstance(label, np.ndarray):
        if not np.issubdtype(label.dtype, np.integer):
            raise TypeError(f"label array must be integer, got dtype {label.dtype}")
        label = torch.from_numpy(label.astype(np.int64))
    if not isinstance(label, Tensor):
        raise TypeError(f"label must be a PIL image, numpy array or tensor, got {type(label).__name__}")
    if label.dim() != 2:
        raise ValueError(f"label must be (H, W) (single channel), got shape {tuple(label.shape)}")
    if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
        raise TypeError(f"label tensor must be an integer tensor, got {label.dtype}")
    return label.long()


def _as_tensors(image: Any, label: Any) -> Pair:
    x, y = _image_to_tensor(image), _label_to_tensor(label)
    if x.shape[1:] != y.shape:
        raise ValueError(
            f"image and label sizes differ: image (3, H, W) = {tuple(x.shape)}, label (H, W) = {tuple(y.shape)}"
        )
    return x, y


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, bool):
        raise TypeError(f"{name} must be an int or (height, width), got {size!r}")
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = (int(s) for s in size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a (height, width) pair, got {size!r}") from None
    if h <= 0 or w <= 0 or (h, w) != tuple(size):  # type: ignore[arg-type]
        raise ValueError(
            f"{name} must be a positive integer or a pair of them, got {size!r}; e.g. {name}=512 or {name}=(512, 1024)"
        )
    return h, w


def _triple(values: Sequence[float], name: str) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be 3 numbers (one per RGB channel), got {values!r}") from None
    if len(t) != 3 or not all(math.isfinite(v) for v in t):
        raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel), got {values!r}")
    return t  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ transforms


class Compose:
    """Chains joint transforms: ``Compose([ToTensor(), RandomHorizontalFlip()])(image, label)``."""

    def __init__(self, transforms: Iterable[Callable[[Any, Any], Pair]]) -> None:
        self.transforms: list[Callable[[Any, Any], Pair]] = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise TypeError(f"Compose expects callables (image, label) -> (image, label), got {t!r}")

    def __call__(self, image: Any, label: Any) -> Pair:
        for t in self.transforms:
            image, label = t(image, label)
        return image, label

    def __repr__(self) -> str:
        inner = ",\n".join(f"    {t!r}" for t in self.transforms)
        return f"{type(self).__name__}([\n{inner}\n])"


class ToTensor:
    """PIL / numpy pair -> (float image (3, H, W) in [0, 1], int64 label (H, W)); tensors pass through."""

    def __call__(self, image: Any, label: Any) -> Pair:
        return _as_tensors(image, label)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RandomScale:
    """Resizes both by a factor drawn uniformly from ``scale`` (bilinear image, nearest label).

    The image uses bilinear interpolation (antialiased when shrinking), the label nearest neighbour, both
    with the half-pixel convention so they stay aligned. Draws one value from torch's global RNG per call.

    Args:
        scale: (low, high) with 0 < low <= high.
    """

    def __init__(self, scale: Sequence[float] = (0.5, 2.0)) -> None:
        try:
            lo, hi = (float(s) for s in scale)
        except (TypeError, ValueError):
            raise TypeError(f"scale must be a (low, high) pair of numbers, got {scale!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"scale must satisfy 0 < low <= high, got {scale!r}; e.g. scale=(0.5, 2.0)")
        self.scale = (lo, hi)

    def __call__(self, image: Any, label: Any) -> Pair:
        x, y = _as_tensors(image, label)
        lo, hi = self.scale
        s = lo + (hi - lo) * float(torch.rand(()))
        h, w = y.shape
        size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
        if size == (h, w):
            return x, y
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=s < 1.0)[0]
        y = F.interpolate(y[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
        return x, y

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"


class RandomCrop:
    """Pads (bottom/right) up to ``crop_size`` if needed, then crops a random window of that size.

    The image is padded with ``fill`` (per channel, in [0, 1] units; pass the normalisation mean so that
    padding becomes 0 after :class:`Normalize`), the label with ``ignore_index`` so padding never counts in
    the loss or the metrics. Draws two values from torch's global RNG per call (also when no choice exists).

    Args:
        crop_size: int or (height, width), positive.
        fill: Image padding value per RGB channel.
        ignore_index: Label padding value.
    """

    def __init__(
        self, crop_size: int | Sequence[int], fill: Sequence[float] = (0.0, 0.0, 0.0), ignore_index: int = 255
    ) -> None:
        self.crop_size = _pair(crop_size, "crop_size")
        self.fill = _triple(fill, "fill")
        self.ignore_index = int(ignore_index)

    def __call__(self, image: Any, label: Any) -> Pair:
        x, y = _as_tensors(image, label)
        ch, cw = self.crop_size
        h, w = y.shape
        ph, pw = max(h, ch), max(w, cw)
        if (ph, pw) != (h, w):
            fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(3, 1, 1)
            xp = fill.expand(3, ph, pw).clone()
            xp[:, :h, :w] = x
            yp = torch.full((ph, pw), self.ignore_index, dtype=y.dtype, device=y.device)
            yp[:h, :w] = y
            x, y = xp, yp
        top = int(torch.randint(0, ph - ch + 1, ()))
        left = int(torch.randint(0, pw - cw + 1, ()))
        return x[:, top : top + ch, left : left + cw].contiguous(), y[top : top + ch, left : left + cw].contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(crop_size={self.crop_size}, fill={self.fill}, ignore_index={self.ignore_index})"


class RandomHorizontalFlip:
    """Mirrors image and label left-right together with probability ``p`` (one RNG draw per call)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, image: Any, label: Any) -> Pair:
        x, y = _as_tensors(image, label)
        if float(torch.rand(())) < self.p:
            x, y = x.flip(-1), y.flip(-1)
        return x, y

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class Normalize:
    """``image = (image - mean) / std`` per channel; the label is unchanged (converted to int64)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = _triple(mean, "mean")
        self.std = _triple(std, "std")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive per channel, got {std!r}")

    def __call__(self, image: Any, label: Any) -> Pair:
        x, y = _as_tensors(image, label)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x - mean) / std, y

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


# ------------------------------------------------------------------------------------------------ factories


def train_transform(
    crop_size: int | Sequence[int],
    scale: Sequence[float] | None = (0.5, 2.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    flip_p: float = 0.5,
    ignore_index: int = 255,
) -> Compose:
    """The training pipeline: ToTensor, RandomScale, RandomCrop (pad image with ``mean``, label with
    ``ignore_index``), RandomHorizontalFlip, Normalize.

    Args:
        crop_size: Output side (int) or (height, width).
        scale: (low, high) random scale range; ``None`` disables scaling.
        mean: Normalisation mean per RGB channel (also the image padding value, so padding -> 0).
        std: Normalisation std per RGB channel.
        flip_p: Probability of a horizontal flip.
        ignore_index: Label value of padded pixels.

    Returns:
        Callable (image, label) -> (FloatTensor (3, *crop), LongTensor (*crop)).
    """
    steps: list[Callable[[Any, Any], Pair]] = [ToTensor()]
    if scale is not None:
        steps.append(RandomScale(scale))
    steps += [
        RandomCrop(crop_size, fill=mean, ignore_index=ignore_index),
        RandomHorizontalFlip(flip_p),
        Normalize(mean, std),
    ]
    return Compose(steps)


def eval_transform(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Compose:
    """The evaluation pipeline: ToTensor + Normalize (full image, no randomness).

    Returns:
        Callable (image, label) -> (FloatTensor (3, H, W), LongTensor (H, W)).
    """
    return Compose([ToTensor(), Normalize(mean, std)])
