"""Evaluate a ``segmentation.train`` checkpoint: mIoU, per-class IoU table, optional colour PNGs.

    python -m segmentation.evaluate --checkpoint runs/segmentation/checkpoint.pt --data DIR
    python -m segmentation.evaluate --checkpoint CKPT --data DIR --split val --save-predictions 8 --out preds/

The model is rebuilt from the options stored in the checkpoint (arch, norm, width, output stride, AMP)
and evaluated on whole images, exactly as the trainer's own evaluation. Under ``torchrun`` the split is
sharded over the processes and the confusion matrices are summed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from trainkit import (
    CheckpointError,
    DeviceError,
    DistInfo,
    cleanup_distributed,
    int_range,
    load_checkpoint,
    run_cli,
    setup_distributed,
)

from .data import CITYSCAPES_CLASSES, NUM_CLASSES, CityscapesSegmentation, DataError
from .models import build_model
from .train import CHECKPOINT_NAME, evaluate, resolve_device
from .transforms import eval_transform

__all__ = ["main", "build_parser", "load_model", "run"]

_MODEL_ARGS = ("arch", "norm", "width", "output_stride")


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of ``python -m segmentation.evaluate``."""
    p = argparse.ArgumentParser(
        prog="python -m segmentation.evaluate",
        description="Evaluate a segmentation.train checkpoint on a Cityscapes-layout split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help=f"a {CHECKPOINT_NAME} of segmentation.train")
    p.add_argument(
        "--data", default=None, metavar="DIR", help="data folder (default: the one the model was trained on)"
    )
    p.add_argument("--split", default="val")
    p.add_argument(
        "--save-predictions",
        type=int_range(0),
        default=0,
        metavar="K",
        help="write colour PNGs of the first K predictions (and labels) to --out",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for the PNGs and results.json (default: predictions-SPLIT next to the checkpoint)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workers", type=int_range(0), default=0)
    p.add_argument("--threads", type=int_range(1), default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def load_model(path: str, device: torch.device = torch.device("cpu")) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuilds the model of a ``segmentation.train`` checkpoint and loads its weights (eval mode).

    Returns:
        (model on ``device``, the checkpoint dict).

    Raises:
        CheckpointError: missing/corrupt file, not a segmentation.train checkpoint, or weights that do not fit.
    """
    ckpt = load_checkpoint(path, required=("model", "args"), kind="segmentation.train", option="--checkpoint")
    saved = ckpt["args"]
    missing = [k for k in _MODEL_ARGS if k not in saved]
    if missing:
        raise CheckpointError(f"--checkpoint {path!r} is not a segmentation.train checkpoint (its args lack {missing})")
    num_classes = int(ckpt.get("num_classes", NUM_CLASSES))
    model = build_model(
        saved["arch"], num_classes, norm=saved["norm"], output_stride=saved["output_stride"], width=saved["width"]
    )
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:  # size/key mismatch, a malformed state dict
        raise CheckpointError(
            f"--checkpoint {path!r}: the weights do not fit {saved['arch']} width={saved['width']} "
            f"({type(e).__name__}: {e})"
        ) from e
    return model.to(device, getattr(torch, saved.get("dtype", "float32"))).eval(), ckpt


def run(args: argparse.Namespace, info: DistInfo | None = None) -> dict[str, Any]:
    """Evaluates ``args.checkpoint``; returns {"miou", "pixel_acc", "iou", "table", "images"}."""
    own_group = info is None
    if info is None:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        info = setup_distributed(resolve_device(args.device))
    try:
        model, ckpt = load_model(args.checkpoint, info.device)
        saved = ckpt["args"]
        data = args.data if args.data is not None else saved.get("data")
        if data is None or not os.path.isdir(data):
            raise DataError(f"--data folder {data!r} does not exist; pass --data DIR (a Cityscapes-layout folder)")
        dataset = CityscapesSegmentation(data, args.split, eval_transform())
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"predictions-{args.split}")
        cm = evaluate(
            model,
            dataset,
            info.device,
            int(ckpt.get("num_classes", NUM_CLASSES)),
            amp=bool(saved.get("amp", False)),
            save_predictions=args.save_predictions,
            out_dir=out,
            info=info,
            workers=args.workers,
            show_progress=not args.no_progress,
        )
        iou = cm.iou().tolist()
        result = {
            "miou": cm.miou(),
            "pixel_acc": cm.pixel_accuracy(),
            "iou": {n: (None if math.isnan(v) else v) for n, v in zip(CITYSCAPES_CLASSES, iou)},
            "table": cm.table(CITYSCAPES_CLASSES),
            "images": len(dataset),
        }
        if info.is_main:
            print(
                f"{saved['arch']} + DeepLabV3 (norm={saved['norm']}, width={saved['width']:g}) from "
                f"{args.checkpoint} (epoch {ckpt.get('epoch', '?')}, iteration {ckpt.get('iteration', '?')}); "
                f"{args.split} split of {data}: {len(dataset)} images\n",
                flush=True,
            )
            print(result["table"] + "\n", flush=True)
            print(
                f"mIoU: {result['miou']:.4f} ({100 * result['miou']:.2f}%), pixel accuracy {result['pixel_acc']:.4f}",
                flush=True,
            )
            if args.save_predictions > 0:
                with open(os.path.join(out, "results.json"), "w") as f:
                    json.dump({k: v for k, v in result.items() if k != "table"}, f, indent=2)
                print(f"wrote {min(args.save_predictions, len(dataset))} prediction PNGs to {out}", flush=True)
        return result
    finally:
        if own_group:
            cleanup_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad data/checkpoint/option/device)."""
    return run_cli(build_parser(), run, argv, (DataError, CheckpointError, ValueError, DeviceError))


if __name__ == "__main__":
    sys.exit(main())
