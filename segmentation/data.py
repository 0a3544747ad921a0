"""Cityscapes-layout semantic segmentation data (no download, ever).

Expected layout (the official one; ``python -m segmentation.synthetic --out DIR`` writes exactly this)::

    root/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png       RGB image
    root/gtFine/{split}/{city}/{name}_gtFine_labelIds.png        single-channel label ids (0..33)

Label ids are mapped to the 19 evaluation classes ("trainIds") with :data:`LABEL_ID_TO_TRAIN_ID`;
every other id (unlabeled, ego vehicle, parking, caravan, ...) becomes :data:`IGNORE_INDEX` (255).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "CityscapesLabel",
    "CITYSCAPES_LABELS",
    "CITYSCAPES_CLASSES",
    "NUM_CLASSES",
    "IGNORE_INDEX",
    "LABEL_ID_TO_TRAIN_ID",
    "label_ids_to_train_ids",
    "CityscapesSegmentation",
    "IMAGE_SUFFIX",
    "LABEL_SUFFIX",
]

IGNORE_INDEX = 255
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
_IMAGE_DIR = "leftImg8bit"
_LABEL_DIR = "gtFine"
_LAYOUT = (
    "Expected the Cityscapes layout: ROOT/leftImg8bit/SPLIT/CITY/NAME_leftImg8bit.png with labels in "
    "ROOT/gtFine/SPLIT/CITY/NAME_gtFine_labelIds.png (write a small one with "
    "`python -m segmentation.synthetic --out DIR`)."
)


class DataError(RuntimeError):
    """A data set is missing, incomplete or corrupt; the message names the file and the fix."""


class CityscapesLabel(NamedTuple):
    """One row of the official Cityscapes label table."""

    name: str
    id: int
    train_id: int  # 255 = ignored in training and evaluation
    color: tuple[int, int, int]


# The official Cityscapes label definitions (name, labelId, trainId, colour).
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, 255, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, (119, 11, 32)),
    # id -1 cannot be stored in an 8-bit PNG; it wraps to 255, which is ignored like every unknown id.
    CityscapesLabel("license plate", -1, 255, (0, 0, 142)),
)


def _build_lookup() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)  # every id not in the table -> ignore
    for lab in CITYSCAPES_LABELS:
        if 0 <= lab.id <= 255:
            lut[lab.id] = lab.train_id
    lut.flags.writeable = False
    return lut


#: ``LABEL_ID_TO_TRAIN_ID[label_id] -> train_id`` (uint8, 256 entries; ids without a trainId -> 255).
LABEL_ID_TO_TRAIN_ID: np.ndarray = _build_lookup()

#: The 19 evaluation classes, indexed by trainId.
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(
    lab.name
    for lab in sorted((lb for lb in CITYSCAPES_LABELS if lb.train_id != IGNORE_INDEX), key=lambda lb: lb.train_id)
)
NUM_CLASSES = len(CITYSCAPES_CLASSES)
assert NUM_CLASSES == 19 and all(LABEL_ID_TO_TRAIN_ID[lb.id] == lb.train_id for lb in CITYSCAPES_LABELS if lb.id >= 0)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Maps an array of Cityscapes label ids to trainIds (ignored / unknown ids -> 255).

    Args:
        label_ids: Integer array of any shape, e.g. (H, W). Values outside 0..255 are treated as unknown.

    Returns:
        uint8 array of the same shape with values in 0..18 or 255.
    """
    a = np.asarray(label_ids)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"label_ids must be an integer array, got dtype {a.dtype}")
    if a.dtype == np.uint8:
        return LABEL_ID_TO_TRAIN_ID[a]
    out = np.full(a.shape, IGNORE_INDEX, dtype=np.uint8)
    ok = (a >= 0) & (a <= 255)
    out[ok] = LABEL_ID_TO_TRAIN_ID[a[ok].astype(np.int64)]
    return out


_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")


def _valid_label_ids() -> np.ndarray:
    valid = np.zeros(256, dtype=bool)
    for lab in CITYSCAPES_LABELS:
        valid[lab.id % 256] = True  # -1 (license plate) is stored as 255 in an 8-bit PNG
    valid.flags.writeable = False
    return valid


# VALID_LABEL_ID[v]: v is a Cityscapes label id as stored in a *_gtFine_labelIds.png (0..33, and 255 for -1).
_VALID_LABEL_ID = _valid_label_ids()


def _check_label_ids(label_ids: np.ndarray, path: str) -> None:
    """Refuses a label array holding values that are not Cityscapes label ids (DataError naming the file)."""
    a = np.asarray(label_ids)
    in_range = (a >= 0) & (a <= 255)
    ok = in_range.all() and bool(_VALID_LABEL_ID[a.astype(np.int64)].all())
    if ok:
        return
    values = np.unique(a)
    bad = [int(v) for v in values if not (0 <= v <= 255 and _VALID_LABEL_ID[int(v)])]
    shown = ", ".join(map(str, bad[:8])) + (f" ... ({len(bad)} values)" if len(bad) > 8 else "")
    raise DataError(
        f"label {path!r} holds values that are not Cityscapes label ids ({shown}; valid: 0..33, and 255 for -1). "
        "It is not a *_gtFine_labelIds.png (an instanceIds, trainIds-remapped, colour or lossy-compressed "
        "file?): replace it with the labelIds file (or delete the image/label pair)."
    )


def _open_image(path: str) -> Image.Image:
    """Opens (header only) a PNG, turning any PIL/IO failure into a DataError naming the file."""
    try:
        img = Image.open(path)
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise DataError(
            f"cannot read image {path!r} ({type(e).__name__}: {e}). The file is unreadable or not a valid "
            "image: replace it (or delete the image/label pair)."
        ) from e
    return img


def _load(path: str, mode: str | None) -> Image.Image:
    """Fully decodes a PNG (catches truncated/corrupt pixel data) and converts it to ``mode`` if given."""
    img = _open_image(path)
    try:
        with img:
            img.load()
            out = img.convert(mode) if mode is not None and img.mode != mode else img.copy()
    except Exception as e:
        raise DataError(
            f"cannot decode image {path!r} ({type(e).__name__}: {e}). The file is truncated or corrupt: "
            "replace it (or delete the image/label pair)."
        ) from e
    return out


def _scan(folder: str, suffix: str) -> list[str]:
    """Paths relative to ``folder`` of all files ending in ``suffix`` (recursive), sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fn in filenames:
            if fn.endswith(suffix):
                found.append(os.path.relpath(os.path.join(dirpath, fn), folder))
    return sorted(found)


class CityscapesSegmentation(Dataset):
    """A Cityscapes-layout segmentation split as a map-style dataset.

    All image/label pairs are discovered (sorted by city and name) and checked when the dataset is
    built: missing folders, images without labels, labels without images, unreadable headers, labels that
    are not PNG files (a JPEG named .png is lossy) or not single-channel and image/label size mismatches
    raise :class:`DataError` naming the file. Corrupt pixel data and label values that are not Cityscapes
    label ids (0..33, 255) only show when decoding: they raise :class:`DataError` from ``__getitem__``.

    Args:
        root: Folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: Sub-folder name, e.g. ``"train"``, ``"val"``.
        transform: Callable ``(image, label) -> (image, label)`` receiving a PIL RGB image and a PIL
            mode "L" label whose values are already trainIds (0..18, 255 = ignore), e.g.
            :func:`segmentation.transforms.train_transform`. ``None`` returns
            (FloatTensor (3, H, W) in [0, 1], LongTensor (H, W)).

    Attributes:
        files: List of (image_path, label_path), in item order.
    """

    def __init__(self, root: str, split: str = "train", transform: Callable[..., Any] | None = None) -> None:
        root = os.fspath(root)
        if not isinstance(split, str) or not split or os.sep in split or split in (".", ".."):
            raise ValueError(f"split must be a folder name such as 'train' or 'val', got {split!r}")
        if not os.path.isdir(root):
            raise DataError(f"data root {root!r} does not exist or is not a folder. {_LAYOUT}")
        self.root = root
        self.split = split
        self.transform = transform
        image_dir = os.path.join(root, _IMAGE_DIR, split)
        label_dir = os.path.join(root, _LABEL_DIR, split)
        for d in (image_dir, label_dir):
            if not os.path.isdir(d):
                present = sorted(os.listdir(os.path.dirname(d))) if os.path.isdir(os.path.dirname(d)) else None
                hint = f" (splits present there: {', '.join(present)})" if present else ""
                raise DataError(f"split folder {d!r} not found{hint}. {_LAYOUT}")
        images = _scan(image_dir, IMAGE_SUFFIX)
        labels = _scan(label_dir, LABEL_SUFFIX)
        if not images:
            raise DataError(f"no images (*{IMAGE_SUFFIX}) found under {image_dir!r}. {_LAYOUT}")
        stems_img = {p[: -len(IMAGE_SUFFIX)] for p in images}
        stems_lab = {p[: -len(LABEL_SUFFIX)] for p in labels}
        for stem in sorted(stems_img - stems_lab):
            raise DataError(
                f"image {os.path.join(image_dir, stem + IMAGE_SUFFIX)!r} has no label file: expected "
                f"{os.path.join(label_dir, stem + LABEL_SUFFIX)!r}. Add the label or remove the image."
            )
        for stem in sorted(stems_lab - stems_img):
            raise DataError(
                f"label {os.path.join(label_dir, stem + LABEL_SUFFIX)!r} has no image: expected "
                f"{os.path.join(image_dir, stem + IMAGE_SUFFIX)!r}. Add the image or remove the label."
            )
        self.files: list[tuple[str, str]] = [
            (os.path.join(image_dir, p), os.path.join(label_dir, p[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX))
            for p in images
        ]
        for img_path, lab_path in self.files:
            self._check_pair(img_path, lab_path)

    @staticmethod
    def _check_pair(img_path: str, lab_path: str) -> None:
        """Header-level checks (cheap: no pixel decoding)."""
        with _open_image(img_path) as img:
            img_size = img.size
        with _open_image(lab_path) as lab:
            lab_size, lab_mode, lab_format = lab.size, lab.mode, lab.format
        if lab_format != "PNG":
            raise DataError(
                f"label {lab_path!r} is a {lab_format or 'non-PNG'} file named .png. Label ids must be stored "
                "losslessly (a JPEG changes the ids of pixels near every edge): replace it with the PNG labelIds "
                "file (or delete the image/label pair)."
            )
        if lab_mode not in _LABEL_MODES:
            raise DataError(
                f"label {lab_path!r} has mode {lab_mode!r} but must be single-channel (mode 'L': one label id "
                "per pixel, the *_gtFine_labelIds.png file, not the colour visualisation *_gtFine_color.png)."
            )
        if img_size != lab_size:
            raise DataError(
                f"size mismatch: image {img_path!r} is {img_size[0]}x{img_size[1]} (WxH) but its label "
                f"{lab_path!r} is {lab_size[0]}x{lab_size[1]}. Image and label must have the same size."
            )

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[Image.Image, Image.Image]:
        """The raw pair: (PIL RGB image, PIL mode "L" label in trainIds) before any transform."""
        img_path, lab_path = self.files[index]
        image = _load(img_path, "RGB")
        label = _load(lab_path, None)
        if label.mode not in _LABEL_MODES:
            raise DataError(f"label {lab_path!r} has mode {label.mode!r} but must be single-channel (mode 'L').")
        if image.size != label.size:
            raise DataError(
                f"size mismatch: image {img_path!r} is {image.size[0]}x{image.size[1]} (WxH) but its label "
                f"{lab_path!r} is {label.size[0]}x{label.size[1]}."
            )
        label_ids = np.asarray(label)
        _check_label_ids(label_ids, lab_path)
        train_ids = label_ids_to_train_ids(label_ids)
        return image, Image.fromarray(train_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.load(index)
        if self.transform is not None:
            return self.transform(image, label)
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        y = torch.from_numpy(np.array(label, dtype=np.int64))
        return x.contiguous(), y

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, images={len(self)})"
