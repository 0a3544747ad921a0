"""Datasets for ``python -m densenet.train``: in-memory tensors (no download, ever) and their Dataset.

* ``load_digits_tensors``: scikit-learn's bundled digits (1797 grey 8x8 images, 10 classes), split
  deterministically (seeded, stratified) into train/test, standardised with the train statistics,
  upsampled to ``size`` x ``size`` (bilinear) and replicated to 3 channels.
* ``load_cifar10_tensors``: a LOCAL CIFAR-10 copy in the standard python-pickle layout
  (``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``), normalised per channel.

Both return ``(x_train, y_train, x_test, y_test)``: float32 (N, 3, H, W) images and int64 (N,) labels.

* :class:`ImageTensorDataset`: such tensors as a ``torch.utils.data.Dataset`` with an optional per-image
  transform, e.g. :class:`RandomCropFlip` (the CIFAR augmentation); :func:`load_datasets` builds the
  train/test pair the trainer feeds to its DataLoaders.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "load_digits_tensors",
    "load_cifar10_tensors",
    "load_datasets",
    "ImageTensorDataset",
    "RandomCropFlip",
    "DATASETS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
]

#: Values of ``--data``.
DATASETS: tuple[str, ...] = ("digits", "cifar10")

Tensors = tuple[Tensor, Tensor, Tensor, Tensor]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_CIFAR_FIX = (
    "Download and extract the 'CIFAR-10 python version' (cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html) yourself and pass --data-dir pointing at the folder "
    "that contains cifar-10-batches-py/ (or at cifar-10-batches-py/ itself)."
)


class DataError(RuntimeError):
    """A dataset is missing, incomplete or corrupt; the message names the file and the fix."""


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: per class, a seeded permutation; the first round(frac*n) go to test."""
    rng = np.random.RandomState(seed)
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def load_digits_tensors(size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> Tensors:
    """scikit-learn digits as (x_train, y_train, x_test, y_test); x is float32 (N, 3, size, size).

    Args:
        size: Output side (8 keeps the native resolution; 16 = bilinear 2x upsampling).
        test_fraction: Fraction of each class held out for test.
        seed: Seed of the split (the same seed always gives the same split).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError(
            "the default dataset (digits) needs scikit-learn: pip install scikit-learn "
            "(or use --data cifar10 --data-dir PATH)"
        ) from e
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    tr, te = _stratified_split(y, test_fraction, seed)
    mean, std = float(x[tr].mean()), float(x[tr].std())
    xt = (torch.from_numpy(x) - mean) / std
    xt = xt.unsqueeze(1)
    if size != 8:
        xt = F.interpolate(xt, size=(size, size), mode="bilinear", align_corners=False)
    xt = xt.expand(-1, 3, -1, -1).contiguous()
    yt = torch.from_numpy(y)
    tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
    return xt[tr_t], yt[tr_t], xt[te_t], yt[te_t]


def _resolve_cifar_dir(data_dir: str) -> str:
    if not data_dir:
        raise DataError(f"--data cifar10 needs --data-dir. {_CIFAR_FIX}")
    if not os.path.isdir(data_dir):
        raise DataError(f"CIFAR-10 directory not found: {data_dir!r}. {_CIFAR_FIX}")
    nested = os.path.join(data_dir, "cifar-10-batches-py")
    return nested if os.path.isdir(nested) else data_dir


def _load_cifar_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch -> (N, 3, 32, 32) uint8, (N,) int64."""
    if not os.path.isfile(path):
        raise DataError(f"CIFAR-10 file missing: {path!r}. {_CIFAR_FIX}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... on a truncated/corrupt file
        raise DataError(
            f"CIFAR-10 file {path!r} is corrupt (cannot unpickle: {type(e).__name__}: {e}). "
            f"Delete it and re-extract the archive. {_CIFAR_FIX}"
        ) from e
    if not isinstance(d, dict):
        raise DataError(
            f"CIFAR-10 file {path!r} is corrupt: expected a pickled dict, got {type(d).__name__}. "
            f"Re-extract the archive. {_CIFAR_FIX}"
        )
    # Accept both bytes keys (python 2 pickles, the official files) and str keys.
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        keys = sorted(repr(k) for k in d)
        raise DataError(
            f"CIFAR-10 file {path!r} is corrupt: missing b'data' or b'labels' (keys: {', '.join(keys)}). "
            f"Re-extract the archive. {_CIFAR_FIX}"
        )
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(
            f"CIFAR-10 file {path!r} is corrupt: b'data' must be (N, 3072) uint8, got "
            f"{data.shape} {data.dtype}. Re-extract the archive. {_CIFAR_FIX}"
        )
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"CIFAR-10 file {path!r} is corrupt: {data.shape[0]} images but labels of shape "
            f"{labels.shape}. Re-extract the archive. {_CIFAR_FIX}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10 file {path!r} is corrupt: labels outside 0..9. Re-extract the archive. {_CIFAR_FIX}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10_tensors(data_dir: str) -> Tensors:
    """A local CIFAR-10 (python pickle layout) as (x_train, y_train, x_test, y_test), per-channel normalised.

    Args:
        data_dir: The folder holding ``cifar-10-batches-py/`` or that folder itself. Never downloads.

    Raises:
        DataError: missing folder or file, or a corrupt file (the message names it and says how to fix it).
    """
    root = _resolve_cifar_dir(data_dir)
    parts = [_load_cifar_file(os.path.join(root, name)) for name in _CIFAR_TRAIN_FILES]
    x_test, y_test = _load_cifar_file(os.path.join(root, _CIFAR_TEST_FILE))
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    def norm(x: np.ndarray) -> Tensor:
        return (torch.from_numpy(x).float() / 255.0 - mean) / std

    return norm(x_train), torch.from_numpy(y_train), norm(x_test), torch.from_numpy(y_test)


# ------------------------------------------------------------------------------------------- Dataset


class RandomCropFlip:
    """Random crop with ``padding`` zero pixels on every side, then a random horizontal flip, of one image.

    Draws from the global torch RNG (saved and restored by the trainer's checkpoints, so resume is exact).

    Args:
        padding: Zero padding per side before the crop back to the input size (4 for CIFAR).
        flip_p: Probability of the horizontal flip.
    """

    def __init__(self, padding: int = 4, flip_p: float = 0.5) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.padding, self.flip_p = int(padding), float(flip_p)

    def __call__(self, image: Tensor) -> Tensor:
        """(C, H, W) -> (C, H, W): a new tensor (the input is not modified)."""
        _, h, w = image.shape
        p = self.padding
        i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
        flip = bool(torch.rand(()) < self.flip_p)
        crop = F.pad(image, (p, p, p, p))[:, i : i + h, j : j + w]
        return crop.flip(-1) if flip else crop.contiguous()

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip_p={self.flip_p})"


class ImageTensorDataset(Dataset):
    """Images and labels held in two tensors, with an optional transform applied to each image on access.

    Args:
        images: (N, C, H, W).
        labels: (N,) int64.
        transform: Maps one (C, H, W) image to another (e.g. :class:`RandomCropFlip`); None: as stored.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def load_datasets(
    name: str,
    data_dir: str | None = None,
    image_size: int = 16,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    dtype: torch.dtype = torch.float32,
    augment: bool | Callable[[Tensor], Tensor] | None = False,
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """The (train, test) datasets of ``python -m densenet.train``.

    Args:
        name: ``"digits"`` or ``"cifar10"``.
        data_dir: cifar10: the folder holding ``cifar-10-batches-py/`` (or that folder).
        image_size: digits: side of the upsampled images.
        seed: digits: seed of the train/test split.
        limit_train: Keep only the first N training images (None: all).
        limit_test: Keep only the first N test images (None: all).
        dtype: Floating type of the images.
        augment: True: :class:`RandomCropFlip` on the training images; a callable: that transform; False/None: none.

    Raises:
        ValueError: unknown ``name``.
        DataError: a missing or corrupt data set (see the loaders).
    """
    if name == "digits":
        xtr, ytr, xte, yte = load_digits_tensors(size=image_size, seed=seed)
    elif name == "cifar10":
        xtr, ytr, xte, yte = load_cifar10_tensors(data_dir or "")
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if limit_train is not None:
        xtr, ytr = xtr[:limit_train], ytr[:limit_train]
    if limit_test is not None:
        xte, yte = xte[:limit_test], yte[:limit_test]
    transform = RandomCropFlip() if augment is True else (augment or None)
    return (ImageTensorDataset(xtr.to(dtype), ytr, transform), ImageTensorDataset(xte.to(dtype), yte))
