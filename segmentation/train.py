"""Train a DeepLabV3 segmentation network (WiderResNet-38 A2 / ResNet-50/101) with In-Place ABN.

    python -m segmentation.train --data DIR --arch wrn38 --norm iabn                 # one process
    torchrun --nproc-per-node 2 -m segmentation.train --data DIR --norm iabn_sync    # DDP (gloo / NCCL)
    python -m segmentation.train --data DIR ... --resume runs/segmentation/checkpoint.pt   # continue exactly

``DIR`` has the Cityscapes layout (``leftImg8bit/{train,val}``, ``gtFine/{train,val}``); ``python -m
segmentation.synthetic --out DIR`` writes a small generated one, and ``python -m segmentation.demo`` does
both (generate + a short CPU run).

Training: SGD (momentum, weight decay) with the poly schedule ``lr * (1 - it / max_it) ** power``
stepped every iteration; cross-entropy ignoring label 255; optional AMP (``torch.autocast``: bfloat16
on CPU, float16 + GradScaler on CUDA). Under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the
environment) every process joins a gloo (CPU) or NCCL (CUDA) group, the model is wrapped in
DistributedDataParallel and ``--norm iabn_sync`` synchronises the batch statistics; ``--batch-size`` is
per process. Only rank 0 prints, logs and writes files.

Writes to ``--out``: ``log.csv`` (one row per epoch: epoch, iters, lr, train_loss, val_miou, pixel_acc,
seconds), ``checkpoint.pt`` (atomically replaced each epoch: model, optimizer, scheduler, grad scaler,
epoch, iteration, every rank's RNG states, arguments), ``final.json`` (mIoU, per-class IoU, memory) and
``predictions/`` (colour PNGs of the first ``--save-predictions`` validation images and their labels).

The walk: :func:`run` (process group) -> ``_train`` (builds data, model, optimizer, scheduler, scaler, log,
checkpointing; loops over epochs) -> :func:`train_one_epoch` (at most the iterations left of ``--iters``)
-> :func:`evaluate` (every ``--eval-every`` epochs and after the last). Resume, ``--stop-after`` and the
saved-memory meter are :mod:`trainkit.resume` and :mod:`trainkit.memory_meter`, shared with densenet.train.

Exact resume: the data order of epoch e is a permutation seeded with ``seed`` and ``e`` (DistributedSampler),
DataLoader workers are seeded from a generator seeded with (seed, epoch, rank), and the global RNGs that
the transforms use with ``--workers 0`` are saved in the checkpoint and restored; a run interrupted after
any epoch and continued with ``--resume`` produces the same losses and weights as one that was not
(same machine, thread count and number of processes).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from trainkit import (
    CheckpointError,
    DeviceError,
    DistInfo,
    DivergenceError,
    ResumeError,
    ResumePoint,
    SavedMemory,
    all_gather_objects,
    check_finite_step,
    cleanup_distributed,
    compare_saved_memory,
    float_range,
    format_seconds,
    int_range,
    load_resume_checkpoint,
    prepare_out_dir,
    progress,
    read_csv,
    restore_training_state,
    rng_state,
    run_cli,
    save_training_checkpoint,
    saved_bytes_on_meta,
    seed_everything,
    set_epoch_seed,
    setup_distributed,
    stop_after_reached,
    write_csv,
)

from .data import CITYSCAPES_CLASSES, IGNORE_INDEX, IMAGE_SUFFIX, NUM_CLASSES, CityscapesSegmentation, DataError
from .metrics import ConfusionMatrix, colorize
from .models import ARCHS, build_model
from .norm import NORMS
from .transforms import eval_transform, train_transform

__all__ = [
    "main",
    "run",
    "build_parser",
    "train_one_epoch",
    "evaluate",
    "EpochResult",
    "activation_bytes",
    "saved_memory",
    "memory_report",
    "PolyLR",
    "ResumeError",
    "CSV_FIELDS",
    "CHECKPOINT_NAME",
]

CSV_FIELDS = ("epoch", "iters", "lr", "train_loss", "val_miou", "pixel_acc", "seconds")
CHECKPOINT_NAME = "checkpoint.pt"
# What a run writes into --out: any of them there means an earlier run (refused without --resume / --overwrite).
RUN_FILES = (CHECKPOINT_NAME, "log.csv", "final.json")
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "iteration", "rng", "args")
# Options that must match between the run that wrote a checkpoint and the run resuming it.
_RESUME_MUST_MATCH = (
    "arch",
    "norm",
    "width",
    "output_stride",
    "crop",
    "scale_min",
    "scale_max",
    "flip_p",
    "batch_size",
    "epochs",
    "iters",
    "lr",
    "momentum",
    "weight_decay",
    "poly_power",
    "amp",
    "seed",
    "workers",
    "train_split",
    "dtype",
)
# What checkpoints written before an option existed ran with.
_RESUME_DEFAULTS = {"dtype": "float32"}


# ------------------------------------------------------------------------------------------------ options


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of ``python -m segmentation.train``."""
    p = argparse.ArgumentParser(
        prog="python -m segmentation.train",
        description="Train DeepLabV3 (WiderResNet-38 A2 / ResNet) with In-Place ABN on a Cityscapes-layout data set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="folder with leftImg8bit/ and gtFine/ (python -m segmentation.synthetic --out DIR makes one)",
    )
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--crop", type=int_range(16), default=512, help="side of the square training crops")
    g.add_argument(
        "--scale-min",
        type=float_range(0, low_open=True),
        default=0.5,
        help="random scale range of training images (low)",
    )
    g.add_argument(
        "--scale-max",
        type=float_range(0, low_open=True),
        default=2.0,
        help="random scale range (high); 1 1 disables scaling",
    )
    g.add_argument("--flip-p", type=float_range(0, 1), default=0.5, help="probability of a horizontal flip")
    g.add_argument(
        "--workers",
        type=int_range(0),
        default=0,
        help="DataLoader worker processes per rank (0: load in the main process)",
    )
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default="wrn38")
    g.add_argument(
        "--norm",
        choices=NORMS,
        default="iabn",
        help="bn: BatchNorm2d + LeakyReLU; iabn: In-Place ABN; iabn_sync: synchronised over DDP ranks",
    )
    g.add_argument(
        "--width", type=float_range(0, low_open=True), default=1.0, help="channel multiplier (1.0 = the real network)"
    )
    g.add_argument("--output-stride", type=int, choices=(8, 16), default=16)
    g = p.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int_range(1), default=None, help="passes over the training set (default 50)")
    length.add_argument(
        "--iters",
        type=int_range(1),
        default=None,
        help="total iterations instead of --epochs (the last epoch may be partial)",
    )
    g.add_argument("--batch-size", type=int_range(1), default=8, help="images per process and iteration")
    g.add_argument("--lr", type=float_range(0, low_open=True), default=0.01)
    g.add_argument("--momentum", type=float_range(0, 1), default=0.9)
    g.add_argument("--weight-decay", type=float_range(0), default=1e-4)
    g.add_argument("--poly-power", type=float_range(0), default=0.9, help="lr * (1 - iter / max_iter) ** power")
    g.add_argument(
        "--amp",
        action="store_true",
        help="automatic mixed precision: bfloat16 autocast on CPU, float16 + GradScaler on CUDA",
    )
    g.add_argument("--seed", type=int_range(0, 2**63 - 1), default=0)
    g.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="dtype of parameters and inputs (float64: exact comparisons, e.g. DDP against one process)",
    )
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    g.add_argument("--threads", type=int_range(1), default=None, help="torch.set_num_threads (default: torch's choice)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument(
        "--eval-every",
        type=int_range(0),
        default=1,
        metavar="E",
        help="evaluate on the val split every E epochs (0: only after the last one)",
    )
    g.add_argument(
        "--save-predictions",
        type=int_range(0),
        default=4,
        metavar="K",
        help="write colour PNGs of the first K validation predictions (and labels)",
    )
    g.add_argument("--out", default=os.path.join("runs", "segmentation"))
    g.add_argument("--resume", default=None, metavar="PATH", help="checkpoint.pt to continue from")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier run in --out (without it, or --resume, such an --out is refused)",
    )
    g.add_argument(
        "--stop-after",
        type=int_range(1),
        default=None,
        metavar="N",
        help="stop after N epochs of this process (as if interrupted); continue later with --resume",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch only)")
    return p


def _check_args(args: argparse.Namespace, info: DistInfo) -> None:
    """Option values that argparse cannot check alone (each option's range is its argparse type); ValueError
    naming the option."""
    if args.epochs is None and args.iters is None:
        args.epochs = 50
    global_stats = args.batch_size * (info.world_size if args.norm == "iabn_sync" else 1)
    if global_stats < 2:
        raise ValueError(
            f"--batch-size {args.batch_size} gives batch statistics over a single image "
            f"(norm={args.norm}, {info.world_size} process(es)); use --batch-size >= 2"
        )
    if not args.scale_min <= args.scale_max:
        raise ValueError(f"--scale-min/--scale-max must satisfy min <= max, got {args.scale_min}, {args.scale_max}")
    if args.amp and args.dtype != "float32":
        raise ValueError(
            f"--amp computes in half precision from float32 parameters; it cannot be combined with --dtype {args.dtype}"
        )
    if not os.path.isdir(args.data):
        raise DataError(
            f"--data folder {args.data!r} does not exist. Point --data at a Cityscapes-layout folder "
            "(leftImg8bit/ + gtFine/) or write a small synthetic one with "
            f"`python -m segmentation.synthetic --out {args.data}`."
        )


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is available, else ``"cpu"``; other values unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# --------------------------------------------------------------------------------------------- schedule


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """The poly schedule ``base_lr * (1 - it / max_iters) ** power`` (0 from ``max_iters`` on); step per iteration.

    Args:
        optimizer: The optimizer whose groups' lr it sets.
        max_iters: Iterations of the whole run (> 0).
        power: Exponent (0.9 in DeepLab).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9, last_epoch: int = -1
    ) -> None:
        if max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {max_iters}")
        self.max_iters, self.power = int(max_iters), float(power)
        super().__init__(optimizer, last_epoch)

    def _factor(self) -> float:
        return max(0.0, 1.0 - self.last_epoch / self.max_iters) ** self.power

    def get_lr(self) -> list[float]:  # closed form: no drift, and resume only needs last_epoch
        return [base * self._factor() for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


# ------------------------------------------------------------------------------------------------ memory


def activation_bytes(
    arch: str, norm: str, num_classes: int, width: float, output_stride: int, batch: int, crop: int
) -> int:
    """Bytes autograd saves for backward in one float32 training forward + loss (parameters and buffers excluded).

    Counted exactly on ``device="meta"`` by :func:`trainkit.saved_bytes_on_meta` (nothing is allocated or
    computed, so any size is cheap) with a fresh model; the global RNG is untouched. ``iabn_sync`` saves
    exactly what ``iabn`` saves, so it is counted as ``iabn`` (no process group needed).

    Args:
        arch: As :func:`segmentation.build_model`.
        norm: As :func:`segmentation.build_model`.
        num_classes: As :func:`segmentation.build_model`.
        width: As :func:`segmentation.build_model`.
        output_stride: As :func:`segmentation.build_model`.
        batch: Images per step: the input is (batch, 3, crop, crop), the target (batch, crop, crop).
        crop: Side of the square crops.
    """
    local = "iabn" if norm == "iabn_sync" else norm

    def build() -> nn.Module:
        return build_model(arch, num_classes, norm=local, output_stride=output_stride, width=width)

    def step(model: nn.Module) -> Tensor:
        x = torch.empty(batch, 3, crop, crop)
        y = torch.zeros(batch, crop, crop, dtype=torch.long)
        return F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX)

    return saved_bytes_on_meta(build, step)


def saved_memory(args: argparse.Namespace, batch: int) -> SavedMemory:
    """Saved-for-backward bytes of one training step with ``args.norm`` vs ``norm="bn"`` on the same input."""
    return compare_saved_memory(
        lambda norm: activation_bytes(args.arch, norm, NUM_CLASSES, args.width, args.output_stride, batch, args.crop),
        args.norm,
    )


def memory_report(args: argparse.Namespace, batch: int) -> dict[str, float]:
    """Saved-for-backward MiB of one training step with ``args.norm`` vs ``norm="bn"``: bn_mib, norm_mib, ratio."""
    return saved_memory(args, batch).as_dict()


def _memory_line(mem: SavedMemory, batch: int, crop: int) -> str:
    return mem.line(f"float32 training step, batch {batch} x 3 x {crop} x {crop}")


# ------------------------------------------------------------------------------------------------ evaluation


def _input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's inputs take: its parameters' (``--dtype``)."""
    return next(model.parameters()).dtype


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _prediction_name(dataset: Dataset, index: int) -> str:
    files = getattr(dataset, "files", None)
    if files is not None:
        base = os.path.basename(files[index][0])
        return base[: -len(IMAGE_SUFFIX)] if base.endswith(IMAGE_SUFFIX) else os.path.splitext(base)[0]
    return f"{index:05d}"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    num_classes: int = NUM_CLASSES,
    amp: bool = False,
    save_predictions: int = 0,
    out_dir: str | None = None,
    info: DistInfo = DistInfo(),
    workers: int = 0,
    show_progress: bool = True,
) -> ConfusionMatrix:
    """Whole-image evaluation of ``model`` (eval mode, batch 1) on ``dataset``.

    Under DDP every rank evaluates a contiguous shard and the confusion matrices are summed; rank 0
    writes ``{out_dir}/{name}_pred.png`` and ``{name}_label.png`` (Cityscapes colours) for the first
    ``save_predictions`` images.

    Args:
        model: Maps (1, 3, H, W) -> logits (1, K, H, W); DDP-wrapped models are unwrapped.
        dataset: Items (image FloatTensor (3, H, W), target LongTensor (H, W)).
        device: Where to run.
        num_classes: K.
        amp: Run under autocast (as in training).
        save_predictions: Number of leading images to write as PNGs.
        out_dir: Folder of the PNGs (created by rank 0; needed when ``save_predictions > 0``).
        info: Rank / world size (default: single process).
        workers: DataLoader workers.
        show_progress: Progress bar on rank 0.

    Returns:
        The (all-reduced) confusion matrix.
    """
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    n = len(dataset)  # type: ignore[arg-type]
    chunk = math.ceil(n / info.world_size)
    start, stop = min(info.rank * chunk, n), min((info.rank + 1) * chunk, n)
    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=1, shuffle=False, num_workers=workers)
    cm = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)
    keep: list[tuple[int, Any, Any]] = []
    bar = progress(stop - start, "eval", enabled=show_progress and info.is_main)
    for pos, (x, y) in enumerate(loader):
        with _autocast(device, amp):
            logits = net(x.to(device, _input_dtype(net), non_blocking=True))
        pred = logits.argmax(1).cpu()
        cm.update(pred, y)
        index = start + pos
        if index < save_predictions:
            keep.append((index, pred[0].to(torch.uint8).numpy(), y[0].clamp(0, 255).to(torch.uint8).numpy()))
        bar.update(1)
    bar.close()
    cm.all_reduce()
    if save_predictions > 0:
        gathered = [item for part in all_gather_objects(keep) for item in part]
        if info.is_main:
            if out_dir is None:
                raise ValueError("evaluate(save_predictions > 0) needs out_dir")
            os.makedirs(out_dir, exist_ok=True)
            for index, pred_np, label_np in sorted(gathered, key=lambda t: t[0]):
                name = _prediction_name(dataset, index)
                colorize(pred_np).save(os.path.join(out_dir, f"{name}_pred.png"))
                colorize(label_np).save(os.path.join(out_dir, f"{name}_label.png"))
    if was_training:
        net.train()
    return cm


def _results(cm: ConfusionMatrix) -> dict[str, Any]:
    iou = cm.iou().tolist()
    return {
        "miou": cm.miou(),
        "pixel_acc": cm.pixel_accuracy(),
        "iou": {name: (None if math.isnan(v) else v) for name, v in zip(CITYSCAPES_CLASSES, iou)},
    }


# ------------------------------------------------------------------------------------------------ training


def _say(info: DistInfo, *parts: Any) -> None:
    if info.is_main:
        print(*parts, flush=True)


def _buffer_sync_kwarg(sync: bool) -> dict[str, bool]:
    """DDP's per-forward buffer broadcast switch: ``forward_sync_buffers`` (newer torch) or ``broadcast_buffers``."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": sync}


def _loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over non-ignored pixels (a zero that keeps the graph when every pixel is ignored)."""
    if bool((target != IGNORE_INDEX).any()):
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
    return logits.sum() * 0.0


@dataclass
class EpochResult:
    """What :func:`train_one_epoch` did.

    Attributes:
        iteration: Iterations completed in all after this epoch.
        loss: Mean training loss of the epoch over every rank's iterations (NaN when none ran).
        losses: This rank's loss of every iteration of the epoch.
    """

    iteration: int
    loss: float
    losses: list[float] = field(default_factory=list)


def train_one_epoch(
    model: nn.Module,
    criterion: Callable[[Tensor, Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    device: torch.device,
    epoch: int,
    args: argparse.Namespace,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    iteration: int,
    max_iters: int,
    num_epochs: int | None = None,
    info: DistInfo = DistInfo(),
) -> EpochResult:
    """One pass over ``data_loader``, stopping early once ``max_iters`` iterations are done in all.

    Each iteration: forward (under autocast with ``--amp``), loss, scaled backward, optimizer step, and the
    per-iteration poly ``scheduler`` step.

    Args:
        model: The network (DDP-wrapped under torchrun).
        criterion: Maps (logits, target) to the mean loss.
        optimizer: Stepped once per iteration (through ``scaler``).
        data_loader: Training batches (images, targets) of this epoch.
        device: Where the model lives.
        epoch: 1-based, for the progress bar.
        args: Uses ``amp``, ``no_progress``.
        scheduler: Stepped once per iteration.
        scaler: ``torch.amp.GradScaler`` (disabled unless float16 AMP on CUDA).
        iteration: Iterations completed before this epoch.
        max_iters: The run's iteration budget: the epoch ends when ``iteration`` reaches it.
        num_epochs: Epochs of the run, for the progress bar (default ``args.epochs``).
        info: Rank / world size; the epoch's mean loss is all-reduced over the ranks.

    Returns:
        The iteration count, the epoch's mean loss and this rank's per-iteration losses.

    Raises:
        DivergenceError: the loss (unless a GradScaler is enabled) or the weights after a step are not finite.
    """
    model.train()
    n_this = max(0, min(len(data_loader), max_iters - iteration))
    epochs = num_epochs if num_epochs is not None else args.epochs
    losses: list[float] = []
    loss_sum = 0.0
    with progress(n_this, f"epoch {epoch}/{epochs}", enabled=info.is_main and not args.no_progress) as bar:
        for x, y in data_loader:
            if iteration >= max_iters:
                break
            x, y = x.to(device, _input_dtype(model), non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, args.amp):
                logits = model(x)
            loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            # Loss and weights after the step; a GradScaler (float16 on CUDA) skips the steps whose
            # gradients overflow, so only then is a non-finite loss not divergence.
            check_finite_step(
                getattr(model, "module", model),
                None if scaler.is_enabled() else loss,
                iteration,
                epoch=epoch,
                distributed=info.distributed,
            )
            value = float(loss.detach())
            losses.append(value)
            loss_sum += value
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / len(losses):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    stats = torch.tensor([loss_sum, float(len(losses))], dtype=torch.float64)
    if info.distributed:
        stats_dev = stats.to(device)
        torch.distributed.all_reduce(stats_dev)
        stats = stats_dev.cpu()
    mean = float(stats[0] / stats[1]) if stats[1] > 0 else math.nan
    return EpochResult(iteration=iteration, loss=mean, losses=losses)


def run(args: argparse.Namespace, info: DistInfo | None = None, return_model: bool = False) -> dict[str, Any]:
    """Trains according to ``args`` (joining torchrun's process group when launched by it).

    Args:
        args: Parsed options of :func:`build_parser`.
        info: An already set-up process (None: :func:`trainkit.setup_distributed` is called here and the
            group destroyed at the end).
        return_model: Also return the trained (unwrapped) model under ``"model"``.

    Returns:
        The summary written to ``final.json`` (or a partial one after ``--stop-after``) plus ``"losses"``:
        this rank's loss of every iteration run by this call.
    """
    own_group = info is None
    if info is None:
        if args.threads is not None:  # before any parallel work starts
            torch.set_num_threads(args.threads)
        info = setup_distributed(resolve_device(args.device))
    try:
        with warnings.catch_warnings():
            if args.norm == "iabn_sync" and not info.distributed:
                warnings.filterwarnings("ignore", message="inplace_abn_sync: torch.distributed is not initialised")
            return _train(args, info, return_model)
    finally:
        if own_group:
            cleanup_distributed()


def _datasets(args: argparse.Namespace) -> tuple[CityscapesSegmentation, CityscapesSegmentation]:
    scale = None if args.scale_min == args.scale_max == 1.0 else (args.scale_min, args.scale_max)
    train_set = CityscapesSegmentation(
        args.data,
        args.train_split,
        train_transform(args.crop, scale=scale, flip_p=args.flip_p, ignore_index=IGNORE_INDEX),
    )
    return train_set, CityscapesSegmentation(args.data, args.val_split, eval_transform())


def _run_length(args: argparse.Namespace, iters_per_epoch: int) -> tuple[int, int]:
    """(total iterations, epochs): ``--iters`` (the last epoch may be partial) or ``--epochs`` full epochs."""
    if args.iters is not None:
        return args.iters, math.ceil(args.iters / iters_per_epoch)
    return args.epochs * iters_per_epoch, args.epochs


def _train(args: argparse.Namespace, info: DistInfo, return_model: bool) -> dict[str, Any]:
    """Builds data, model, optimizer, scheduler, scaler, log and checkpointing; loops over the epochs."""
    _check_args(args, info)
    device = info.device
    ckpt = (
        load_resume_checkpoint(
            args.resume,
            vars(args),
            _RESUME_MUST_MATCH,
            kind="segmentation.train",
            required=CHECKPOINT_KEYS,
            checkpoint_name=CHECKPOINT_NAME,
            defaults=_RESUME_DEFAULTS,
        )
        if args.resume
        else None
    )
    prepare_out_dir(args.out, RUN_FILES, resume=args.resume, overwrite=args.overwrite, create=info.is_main)

    # Data: epoch e's order is DistributedSampler's permutation of (seed, e); the loader's generator (worker
    # seeds) is reseeded with (seed, e, rank) every epoch; fixed-size batches (the last incomplete one dropped).
    train_set, val_set = _datasets(args)
    sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    iters_per_epoch = len(sampler) // args.batch_size
    if iters_per_epoch < 1:
        raise DataError(
            f"the {args.train_split!r} split of {args.data!r} has {len(train_set)} images: too few for "
            f"one batch of {args.batch_size} per process on {info.world_size} process(es); "
            "lower --batch-size or add images"
        )
    max_iters, epochs = _run_length(args, iters_per_epoch)
    loader_gen = torch.Generator()
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=True,
        generator=loader_gen,
        pin_memory=device.type == "cuda",
    )

    seed_everything(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(args.arch, NUM_CLASSES, norm=args.norm, output_stride=args.output_stride, width=args.width).to(
        device, getattr(torch, args.dtype)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = PolyLR(optimizer, max_iters, power=args.poly_power)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    seed_everything(args.seed + 7919 * info.rank)  # per-rank augmentation stream (rank 0: the seed itself)
    start = ResumePoint()
    if ckpt is not None:
        start = restore_training_state(
            ckpt, args.resume, model, optimizer, scheduler, scaler, rank=info.rank, world_size=info.world_size
        )
        if not start.rng_exact:
            _say(
                info,
                f"note: the checkpoint was written by {len(ckpt.get('rng_per_rank') or [])} process(es), "
                f"this run has {info.world_size}: the data order continues, the augmentations are not "
                "bit-identical",
            )
    ddp: nn.Module = model
    if info.distributed:
        # iabn_sync already makes the running statistics equal on every rank: no buffer broadcast needed.
        ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            **_buffer_sync_kwarg(args.norm != "iabn_sync"),
        )

    csv_path = os.path.join(args.out, "log.csv")
    ckpt_path = os.path.join(args.out, CHECKPOINT_NAME)
    pred_dir = os.path.join(args.out, "predictions")
    rows: list[dict[str, Any]] = read_csv(csv_path, start.epoch) if (start.resumed and info.is_main) else []

    n_params = sum(p.numel() for p in model.parameters())
    mem = saved_memory(args, args.batch_size)
    _say(
        info,
        f"{args.arch} + DeepLabV3, norm={args.norm}, width={args.width:g}, output stride {args.output_stride}: "
        f"{n_params:,} parameters; {len(train_set)} train / {len(val_set)} val images; {info.world_size} "
        f"process(es) on {device} ({info.backend or 'no process group'}), batch {args.batch_size} per process, "
        f"crop {args.crop}; {max_iters} iterations ({iters_per_epoch} per epoch, {epochs} epoch(s))"
        + (f"; AMP {'float16' if device.type == 'cuda' else 'bfloat16'}" if args.amp else "")
        + (f"; resuming after epoch {start.epoch} (iteration {start.iteration})" if start.resumed else ""),
    )
    if args.norm == "iabn_sync" and not info.distributed:
        _say(info, "note: norm=iabn_sync in a single process (no torchrun): statistics are local, as iabn")
    _say(info, _memory_line(mem, args.batch_size, args.crop))

    losses: list[float] = []
    results: dict[str, Any] | None = None
    if rows and rows[-1].get("val_miou"):
        results = {"miou": float(rows[-1]["val_miou"]), "pixel_acc": float(rows[-1]["pixel_acc"])}
    iteration, elapsed, epoch = start.iteration, start.elapsed, start.epoch
    stopped = False
    for epoch in range(start.epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        set_epoch_seed(loader_gen, args.seed, epoch, info.rank)
        result = train_one_epoch(
            ddp,
            _loss,
            optimizer,
            train_loader,
            device,
            epoch,
            args,
            scheduler=scheduler,
            scaler=scaler,
            iteration=iteration,
            max_iters=max_iters,
            num_epochs=epochs,
            info=info,
        )
        iteration = result.iteration
        losses.extend(result.losses)
        evaluated = epoch == epochs or (args.eval_every > 0 and epoch % args.eval_every == 0)
        if evaluated:
            cm = evaluate(
                ddp,
                val_set,
                device,
                NUM_CLASSES,
                amp=args.amp,
                save_predictions=args.save_predictions if epoch == epochs else 0,
                out_dir=pred_dir,
                info=info,
                workers=args.workers,
                show_progress=not args.no_progress,
            )
            results = _results(cm)
            results["table"] = cm.table(CITYSCAPES_CLASSES)
        seconds = time.perf_counter() - t0
        elapsed += seconds
        rngs = all_gather_objects(rng_state())  # every rank's augmentation RNGs (collective)
        if info.is_main:
            lr_now = optimizer.param_groups[0]["lr"]
            _log_epoch(rows, csv_path, epoch, iteration, lr_now, result.loss, results if evaluated else None, seconds)
            save_training_checkpoint(
                ckpt_path,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                epoch=epoch,
                iteration=iteration,
                rng_per_rank=rngs,
                args=args,
                elapsed=elapsed,
                num_classes=NUM_CLASSES,
            )
            msg = f"epoch {epoch}/{epochs}  iter {iteration}/{max_iters}  train loss {result.loss:.4f}  lr {lr_now:.3g}"
            if evaluated and results:
                msg += f"  val mIoU {results['miou']:.4f} pixel acc {results['pixel_acc']:.4f}"
            print(f"{msg}  {seconds:.1f}s", flush=True)
        if stop_after_reached(args.stop_after, epoch - start.epoch, epoch, epochs):
            _say(info, f"stopped after epoch {epoch}; continue with --resume {ckpt_path}")
            stopped = True
            break

    summary: dict[str, Any] = {
        "epochs": epoch,
        "iterations": iteration,
        "train_seconds": elapsed,
        "params": n_params,
        "memory": mem.as_dict(),
        "world_size": info.world_size,
        "args": vars(args).copy(),
    }
    if results is not None:
        summary.update({k: v for k, v in results.items() if k != "table"})
    if stopped:
        summary["stopped_after"] = epoch
    elif info.is_main:
        _finish(summary, results, args, len(val_set), mem)
    summary["losses"] = losses
    if return_model:
        summary["model"] = model
    return summary


def _log_epoch(
    rows: list[dict[str, Any]],
    csv_path: str,
    epoch: int,
    iteration: int,
    lr: float,
    train_loss: float,
    results: dict[str, Any] | None,
    seconds: float,
) -> None:
    rows.append(
        {
            "epoch": epoch,
            "iters": iteration,
            "lr": f"{lr:.6g}",
            "train_loss": repr(train_loss),
            "val_miou": f"{results['miou']:.6f}" if results else "",
            "pixel_acc": f"{results['pixel_acc']:.6f}" if results else "",
            "seconds": f"{seconds:.3f}",
        }
    )
    write_csv(csv_path, rows, CSV_FIELDS)


def _finish(
    summary: dict[str, Any], results: dict[str, Any] | None, args: argparse.Namespace, n_val: int, mem: SavedMemory
) -> None:
    """Rank 0 at the end of a completed run: final.json, the validation table and the closing lines."""
    with open(os.path.join(args.out, "final.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if results is not None and "table" in results:
        print(f"\nvalidation ({args.val_split}, {n_val} images):\n{results['table']}\n", flush=True)
    print(
        f"final val mIoU: {summary.get('miou', math.nan):.4f} ({100 * summary.get('miou', math.nan):.2f}%), "
        f"pixel accuracy {summary.get('pixel_acc', math.nan):.4f}, after {summary['iterations']} iterations "
        f"({summary['epochs']} epochs, {format_seconds(summary['train_seconds'])} of training)",
        flush=True,
    )
    print(_memory_line(mem, args.batch_size, args.crop), flush=True)


# Exceptions that mean bad options, data, checkpoints or device (one line on stderr, exit status 2), by type.
# torch.OutOfMemoryError: the batch or crop does not fit the device's memory (lower them).
_USER_ERRORS = (DataError, CheckpointError, ValueError, DivergenceError, DeviceError, torch.OutOfMemoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad data/checkpoint/option/device)."""
    return run_cli(build_parser(), run, argv, _USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
