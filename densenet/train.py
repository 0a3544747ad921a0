"""Train a DenseNet-BC on scikit-learn's digits (default) or a local CIFAR-10 copy.

    python -m densenet.train                                   # digits, DenseNet-BC-40 k=12, In-Place ABN
    python -m densenet.train --data cifar10 --data-dir ~/data --epochs 300 --schedule step
    python -m densenet.train --resume runs/densenet-digits/checkpoint.pt   # continue exactly

Writes to ``--out``: ``log.csv`` (one row per epoch), ``checkpoint.pt`` (atomically replaced each epoch:
model, optimizer, scheduler, epoch, RNG states, arguments) and ``final.json`` (final test accuracy).

The walk, as torchvision's reference trainers: :func:`main` (CLI) -> :func:`run` (builds the datasets and
DataLoaders, model, optimizer, scheduler, log and checkpointing; loops over epochs) -> :func:`train_one_epoch`
-> :func:`evaluate`. Resume, ``--stop-after`` and the saved-memory meter are :mod:`trainkit.resume` and
:mod:`trainkit.memory_meter`, shared with segmentation.train. The training order of epoch e is a permutation
drawn from a generator seeded with (seed, e), and the augmentation draws from the global RNG saved in the
checkpoint, so a resumed run is bit-identical to a straight one (same machine and thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from trainkit import (
    DivergenceError,
    ResumeError,
    ResumePoint,
    SavedMemory,
    check_finite_step,
    compare_saved_memory,
    float_range,
    int_range,
    load_resume_checkpoint,
    prepare_out_dir,
    progress,
    read_csv,
    restore_training_state,
    run_cli,
    save_training_checkpoint,
    saved_bytes_on_meta,
    seed_everything,
    set_epoch_seed,
    stop_after_reached,
    write_csv,
)

from .data import DATASETS, DataError, load_datasets
from .model import MEMORY_MODES, NORMS, densenet_bc

__all__ = [
    "main",
    "run",
    "build_parser",
    "train_one_epoch",
    "evaluate",
    "saved_memory",
    "make_scheduler",
    "ResumeError",
    "CSV_FIELDS",
    "CHECKPOINT_NAME",
]

CSV_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "saved_mib")
CHECKPOINT_NAME = "checkpoint.pt"
# What a run writes into --out: any of them there means an earlier run (refused without --resume / --overwrite).
RUN_FILES = (CHECKPOINT_NAME, "log.csv", "final.json")
EVAL_BATCH_SIZE = 500
NUM_CLASSES = 10
# Arguments that must match between the run that wrote a checkpoint and the run resuming it.
_RESUME_MUST_MATCH = (
    "data",
    "image_size",
    "depth",
    "growth_rate",
    "norm",
    "memory",
    "drop_rate",
    "dtype",
    "batch_size",
    "epochs",
    "schedule",
    "lr",
    "weight_decay",
    "limit_train",
    "limit_test",
    "augment",
    "seed",
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of ``python -m densenet.train``."""
    p = argparse.ArgumentParser(
        prog="python -m densenet.train",
        description="Train DenseNet-BC (BatchNorm or In-Place ABN) on digits or a local CIFAR-10 copy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATASETS, default="digits")
    g.add_argument("--data-dir", default=None, help="cifar10: folder holding cifar-10-batches-py/ (never downloaded)")
    g.add_argument("--image-size", type=int_range(4), default=16, help="digits: 8x8 images are upsampled to this side")
    g.add_argument(
        "--augment",
        choices=("auto", "on", "off"),
        default="auto",
        help="random crop (pad 4) + horizontal flip; auto = on for cifar10, off for digits",
    )
    g.add_argument("--limit-train", type=int_range(2), default=None, help="use only the first N training images")
    g.add_argument("--limit-test", type=int_range(1), default=None, help="use only the first N test images")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int_range(10), default=40, help="DenseNet-BC depth, 6n+4")
    g.add_argument("--growth-rate", type=int_range(1), default=12)
    g.add_argument("--norm", choices=NORMS, default="iabn", help="bn: BatchNorm2d + ReLU; iabn: In-Place ABN")
    g.add_argument(
        "--memory",
        choices=MEMORY_MODES,
        default="naive",
        help="memory strategy of the dense layers (efficient needs --norm iabn)",
    )
    g.add_argument("--drop-rate", type=float_range(0, 1, high_open=True), default=0.0)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int_range(1), default=15)
    g.add_argument("--batch-size", type=int_range(2), default=64)
    g.add_argument("--lr", type=float_range(0, low_open=True), default=0.1)
    g.add_argument("--weight-decay", type=float_range(0), default=1e-4)
    g.add_argument(
        "--schedule",
        choices=("cosine", "step"),
        default="cosine",
        help="cosine annealing to 0, or x0.1 at 50%% and 75%% of the epochs",
    )
    g.add_argument("--seed", type=int_range(0, 2**63 - 1), default=0)
    g.add_argument("--threads", type=int_range(1), default=None, help="torch.set_num_threads (default: torch's choice)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=os.path.join("runs", "densenet-digits"))
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


# ------------------------------------------------------------------------------------ train / evaluate


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    device: torch.device,
    epoch: int,
    args: argparse.Namespace,
) -> tuple[float, float]:
    """One pass over ``data_loader`` in training mode: forward, loss, backward, optimizer step per batch.

    Args:
        model: The network.
        criterion: Maps (logits, labels) to the mean loss of the batch.
        optimizer: Stepped once per batch.
        data_loader: Training batches (images, labels).
        device: Where the model lives.
        epoch: 1-based, for the progress bar.
        args: Uses ``epochs`` and ``no_progress``.

    Returns:
        (mean training loss, training accuracy) over the samples seen.

    Raises:
        DivergenceError: the loss or the weights after a step are not finite (names the iteration).
    """
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    with progress(len(data_loader), f"epoch {epoch}/{args.epochs}", enabled=not args.no_progress) as bar:
        for i, (x, y) in enumerate(data_loader, 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            check_finite_step(model, loss, (epoch - 1) * len(data_loader) + i, epoch=epoch)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    return loss_sum / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module, criterion: nn.Module, data_loader: DataLoader, device: torch.device
) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in eval mode over ``data_loader``.

    Args:
        model: The network (left in eval mode).
        criterion: Maps (logits, labels) to the mean loss of the batch.
        data_loader: Test batches (images, labels).
        device: Where the model lives.
    """
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in data_loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += criterion(logits, y).item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


# ------------------------------------------------------------------------------------------- building


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: ``"cosine"`` (annealing to 0 over ``epochs``) or ``"step"`` (x0.1 at 50% and 75%)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    milestones = sorted({max(1, int(round(epochs * 0.5))), max(1, int(round(epochs * 0.75)))})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def saved_memory(args: argparse.Namespace, batch: int, image_shape: Sequence[int]) -> SavedMemory:
    """Saved-for-backward bytes of one training step with ``args.norm`` vs BatchNorm (counted on ``meta``).

    The BatchNorm baseline keeps ``args.memory``, except ``efficient`` (In-Place ABN only), whose baseline
    is ``checkpoint`` (torchvision's ``memory_efficient``).

    Args:
        args: Model options (depth, growth_rate, norm, memory, drop_rate, dtype).
        batch: Images per step.
        image_shape: (C, H, W) of one image.
    """
    dtype = getattr(torch, args.dtype)
    bn_memory = "checkpoint" if args.memory == "efficient" else args.memory

    def count(norm: str) -> int:
        memory = args.memory if norm == args.norm else bn_memory

        def build() -> nn.Module:
            return densenet_bc(
                args.depth,
                growth_rate=args.growth_rate,
                norm=norm,
                memory=memory,
                drop_rate=args.drop_rate,
                num_classes=NUM_CLASSES,
            ).to(dtype)

        def step(model: nn.Module) -> Tensor:
            x = torch.empty(batch, *image_shape, dtype=dtype)
            return F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long))

        return saved_bytes_on_meta(build, step)

    return compare_saved_memory(
        count, args.norm, baseline=f"norm=bn memory={bn_memory}", current=f"norm={args.norm} memory={args.memory}"
    )


def _log_epoch(
    rows: list,
    csv_path: str,
    epoch: int,
    train: tuple[float, float],
    test: tuple[float, float],
    lr: float,
    seconds: float,
    saved_mib: float,
) -> None:
    rows.append(
        {
            "epoch": epoch,
            "train_loss": f"{train[0]:.6f}",
            "train_acc": f"{train[1]:.6f}",
            "test_loss": f"{test[0]:.6f}",
            "test_acc": f"{test[1]:.6f}",
            "lr": f"{lr:.6g}",
            "seconds": f"{seconds:.3f}",
            "saved_mib": f"{saved_mib:.4f}",
        }
    )
    write_csv(csv_path, rows, CSV_FIELDS)


# ------------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds data, model, optimizer, scheduler, log and checkpointing, then loops over the epochs.

    Returns:
        The summary written to final.json (or a partial one after ``--stop-after``).
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ckpt = (
        load_resume_checkpoint(
            args.resume, vars(args), _RESUME_MUST_MATCH, kind="densenet.train", checkpoint_name=CHECKPOINT_NAME
        )
        if args.resume
        else None
    )
    prepare_out_dir(args.out, RUN_FILES, resume=args.resume, overwrite=args.overwrite)
    device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)

    seed_everything(args.seed)
    augment = args.augment == "on" or (args.augment == "auto" and args.data == "cifar10")
    train_set, test_set = load_datasets(
        args.data,
        args.data_dir,
        image_size=args.image_size,
        seed=args.seed,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        dtype=dtype,
        augment=augment,
    )
    if len(train_set) < 2 or len(test_set) < 1:
        raise DataError(f"too little data: {len(train_set)} training / {len(test_set)} test images")
    # Shuffled by a generator reseeded every epoch (set_epoch_seed): the order of epoch e depends on
    # (seed, e) only. A trailing single-image batch is dropped (batch norm needs two).
    shuffle = torch.Generator()
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        generator=shuffle,
        drop_last=len(train_set) % args.batch_size == 1,
    )
    test_loader = DataLoader(test_set, batch_size=EVAL_BATCH_SIZE, shuffle=False)

    model = densenet_bc(
        args.depth,
        growth_rate=args.growth_rate,
        norm=args.norm,
        memory=args.memory,
        drop_rate=args.drop_rate,
        num_classes=NUM_CLASSES,
    ).to(device, dtype)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    scheduler = make_scheduler(optimizer, args.schedule, args.epochs)
    start = (
        restore_training_state(ckpt, args.resume, model, optimizer, scheduler) if ckpt is not None else ResumePoint()
    )

    csv_path = os.path.join(args.out, "log.csv")
    ckpt_path = os.path.join(args.out, CHECKPOINT_NAME)
    rows = read_csv(csv_path, start.epoch) if start.resumed else []

    n_params = sum(p.numel() for p in model.parameters())
    image_shape = tuple(train_set.images.shape[1:])
    mb = min(args.batch_size, len(train_set))
    mem = saved_memory(args, mb, image_shape)
    print(
        f"DenseNet-BC-{args.depth} k={args.growth_rate} norm={args.norm} memory={args.memory}: "
        f"{n_params:,} params, {mem.norm_mib:.2f} MiB saved for backward per batch of {mb}; "
        f"{args.data}: {len(train_set)} train / {len(test_set)} test images of {image_shape}"
        + (f"; resuming after epoch {start.epoch}" if start.resumed else ""),
        flush=True,
    )
    print(mem.line(f"{args.dtype} training step, batch {mb} x {' x '.join(map(str, image_shape))}"), flush=True)

    elapsed, epoch = start.elapsed, start.epoch
    test_loss = test_acc = float("nan")
    if rows:
        test_loss, test_acc = float(rows[-1]["test_loss"]), float(rows[-1]["test_acc"])
    for epoch in range(start.epoch + 1, args.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        set_epoch_seed(shuffle, args.seed, epoch)
        train_loss, train_acc = train_one_epoch(model, criterion, optimizer, train_loader, device, epoch, args)
        scheduler.step()
        test_loss, test_acc = evaluate(model, criterion, test_loader, device)
        seconds = time.perf_counter() - t0
        elapsed += seconds
        _log_epoch(rows, csv_path, epoch, (train_loss, train_acc), (test_loss, test_acc), lr, seconds, mem.norm_mib)
        save_training_checkpoint(
            ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, args=args, elapsed=elapsed
        )
        print(
            f"epoch {epoch}/{args.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
            f"test loss {test_loss:.4f} acc {test_acc:.4f}  lr {lr:.4g}  {seconds:.1f}s",
            flush=True,
        )
        if stop_after_reached(args.stop_after, epoch - start.epoch, epoch, args.epochs):
            print(f"stopped after epoch {epoch}; continue with --resume {ckpt_path}", flush=True)
            return {"stopped_after": epoch, "test_acc": test_acc, "test_loss": test_loss}

    summary = {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "epochs": epoch,
        "train_seconds": elapsed,
        "params": n_params,
        "saved_mib_per_batch": mem.norm_mib,
        "memory": mem.as_dict(),
        "args": vars(args).copy(),
    }
    with open(os.path.join(args.out, "final.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(
        f"final test accuracy: {test_acc:.4f} ({test_acc * 100:.2f}%) after {epoch} epochs, {elapsed:.1f}s of training",
        flush=True,
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad data/checkpoint/option)."""
    return run_cli(build_parser(), run, argv, (DataError, ResumeError, ValueError, DivergenceError))


if __name__ == "__main__":
    sys.exit(main())
