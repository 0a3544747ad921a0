"""Semantic segmentation with In-Place ABN: dilated WiderResNet-38 A2 / ResNet + DeepLabV3, a
Cityscapes-layout loader, a synthetic data set, training and evaluation.

``build_model(arch, num_classes, norm="iabn", output_stride=16, width=1.0)`` builds the network with
every BatchNorm-activation pair of type ``norm`` ("bn", "iabn" or "iabn_sync").
"""

from __future__ import annotations

# ---- data / metrics re-exports (segmentation/data.py, transforms.py, metrics.py) ---------------------
# (synthetic, train, evaluate and demo are run with `python -m`: importing them here would make runpy warn)
from .data import (
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    LABEL_ID_TO_TRAIN_ID,
    NUM_CLASSES,
    CityscapesSegmentation,
    DataError,
)
from .metrics import PALETTE, ConfusionMatrix, colorize
from .models import ARCHS, OUTPUT_STRIDES, SegmentationModel, build_model
from .norm import NORMS, norm_act
from .transforms import eval_transform, train_transform

# ---- end of data / metrics re-exports -----------------------------------------------------------------

__all__ = [
    "build_model",
    "ARCHS",
    "NORMS",
    "OUTPUT_STRIDES",
    "SegmentationModel",
    "norm_act",
    # data / transforms / metrics
    "CITYSCAPES_CLASSES",
    "NUM_CLASSES",
    "IGNORE_INDEX",
    "LABEL_ID_TO_TRAIN_ID",
    "CityscapesSegmentation",
    "DataError",
    "train_transform",
    "eval_transform",
    "ConfusionMatrix",
    "PALETTE",
    "colorize",
]
