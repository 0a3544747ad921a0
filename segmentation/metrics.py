"""Segmentation metrics (confusion matrix, IoU, mIoU, pixel accuracy) and the Cityscapes colour palette.

>>> cm = ConfusionMatrix(19)
>>> cm.update(logits.argmax(1), target)       # any shape, target 255 = ignored
>>> cm.all_reduce()                           # under DDP: sum over ranks
>>> print(cm.miou(), cm.table(CITYSCAPES_CLASSES))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .data import CITYSCAPES_LABELS, IGNORE_INDEX

__all__ = ["ConfusionMatrix", "PALETTE", "colorize"]


def _as_long_tensor(a: Any, name: str) -> Tensor:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if not isinstance(a, Tensor):
        raise TypeError(f"{name} must be a tensor or numpy array of class indices, got {type(a).__name__}")
    if a.is_floating_point() or a.is_complex() or a.dtype == torch.bool:
        hint = " (for logits of shape (N, C, H, W) pass logits.argmax(1))" if name == "pred" else ""
        raise TypeError(f"{name} must hold integer class indices, got dtype {a.dtype}{hint}")
    return a.long()


class ConfusionMatrix:
    """Accumulates a (K, K) confusion matrix: ``matrix[t, p]`` = number of pixels of true class t predicted p.

    Pixels whose target equals ``ignore_index`` are skipped.

    Args:
        num_classes: K, the number of classes (targets and predictions are in 0..K-1).
        ignore_index: Target value to skip (255 by default, as in Cityscapes trainIds).

    Attributes:
        matrix: int64 tensor (K, K) on the CPU; rows = target, columns = prediction.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a valid class index for num_classes={num_classes}; "
                "pick a value outside 0..num_classes-1 (e.g. 255) or None"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Sets all counts to zero."""
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Adds a batch.

        Args:
            pred: Predicted class indices, integer (N, *) or (H, W), values in 0..K-1 (at non-ignored pixels).
            target: True class indices, same shape, values in 0..K-1 or ``ignore_index``.

        Raises:
            ValueError: shapes differ or a value is out of range (the message names it).
            TypeError: a float tensor (e.g. logits) was passed.
        """
        pred = _as_long_tensor(pred, "pred")
        target = _as_long_tensor(target, "target")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got pred {tuple(pred.shape)} and target "
                f"{tuple(target.shape)} (pass logits.argmax(1) for (N, C, H, W) logits)"
            )
        pred = pred.reshape(-1).to(target.device)
        target = target.reshape(-1)
        k = self.num_classes
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return
        bad_t = (target < 0) | (target >= k)
        if bool(bad_t.any()):
            v = int(target[bad_t][0])
            raise ValueError(
                f"target holds value {v} outside 0..{k - 1}"
                + (f" and is not ignore_index={self.ignore_index}" if self.ignore_index is not None else "")
                + " (map label ids to train ids first, or fix num_classes / ignore_index)"
            )
        bad_p = (pred < 0) | (pred >= k)
        if bool(bad_p.any()):
            v = int(pred[bad_p][0])
            raise ValueError(f"pred holds value {v} outside 0..{k - 1} (num_classes={k})")
        counts = torch.bincount(target * k + pred, minlength=k * k)
        self.matrix += counts.view(k, k).cpu()

    def iou(self) -> Tensor:
        """Per-class intersection over union: TP / (TP + FP + FN), float64 (K,).

        A class absent from both targets and predictions has no defined IoU and gets ``nan``.
        """
        m = self.matrix.double()
        tp = m.diagonal()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))

    def miou(self) -> float:
        """Mean IoU over the classes with a defined IoU (nanmean); nan if there is none."""
        iou = self.iou()
        valid = ~torch.isnan(iou)
        return float(iou[valid].mean()) if bool(valid.any()) else math.nan

    def pixel_accuracy(self) -> float:
        """Fraction of non-ignored pixels predicted correctly; nan before any pixel is counted."""
        total = int(self.matrix.sum())
        return int(self.matrix.diagonal().sum()) / total if total else math.nan

    def table(self, class_names: Sequence[str] | None = None) -> str:
        """A markdown table of per-class IoU (in %; "n/a" where undefined), then mIoU and pixel accuracy.

        Args:
            class_names: K names (defaults to "class 0", "class 1", ...).
        """
        k = self.num_classes
        if class_names is None:
            class_names = [f"class {i}" for i in range(k)]
        if len(class_names) != k:
            raise ValueError(f"class_names has {len(class_names)} entries but num_classes is {k}")

        def fmt(v: float) -> str:
            return "n/a" if math.isnan(v) else f"{100.0 * v:.2f}"

        names = [str(n) for n in class_names] + ["**mIoU**", "pixel accuracy"]
        values = [fmt(float(v)) for v in self.iou()] + [fmt(self.miou()), fmt(self.pixel_accuracy())]
        w0 = max(len("class"), *(len(n) for n in names))
        w1 = max(len("IoU (%)"), *(len(v) for v in values))
        lines = [f"| {'class':<{w0}} | {'IoU (%)':>{w1}} |", f"|{'-' * (w0 + 2)}|{'-' * (w1 + 1)}:|"]
        lines += [f"| {n:<{w0}} | {v:>{w1}} |" for n, v in zip(names, values)]
        return "\n".join(lines)

    def all_reduce(self) -> ConfusionMatrix:
        """Sums the matrix over all ranks when ``torch.distributed`` is initialised (no-op otherwise).

        Every rank must call it (it is a collective). Returns ``self``.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            m = self.matrix.to(device)
            dist.all_reduce(m, op=dist.ReduceOp.SUM)
            self.matrix = m.cpu()
        return self

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={int(self.matrix.sum())})"
        )


def _build_palette() -> np.ndarray:
    pal = np.zeros((256, 3), dtype=np.uint8)  # unknown ids and ignore (255) -> black
    for lab in CITYSCAPES_LABELS:
        if lab.train_id != IGNORE_INDEX:
            pal[lab.train_id] = lab.color
    pal.flags.writeable = False
    return pal


#: Official Cityscapes colours indexed by trainId, uint8 (256, 3); 19..255 (incl. ignore 255) are black.
PALETTE: np.ndarray = _build_palette()


def colorize(label: Any) -> Image.Image:
    """A trainId map as a palette ("P" mode) PIL image with the Cityscapes colours (save it as PNG).

    Args:
        label: (H, W) integer tensor or numpy array, values in 0..255 (255 = ignore, drawn black).
    """
    if isinstance(label, Tensor):
        label = label.detach().cpu().numpy()
    a = np.asarray(label)
    if a.ndim != 2:
        raise ValueError(f"label must be (H, W), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"label must hold integer class indices, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"label values must be in 0..255, got min {a.min()} max {a.max()}")
    a = np.ascontiguousarray(a, dtype=np.uint8)
    img = Image.frombytes("P", (a.shape[1], a.shape[0]), a.tobytes())
    img.putpalette(PALETTE.reshape(-1).tolist())
    return img
