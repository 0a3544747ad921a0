"""Train a DenseNet-BC on scikit-learn's digits (default) or a local CIFAR-10 copy.

    python -m densenet.train                                   # digits, DenseNet-BC-40 k=12, In-Place ABN
    python -m densenet.train --data cifar10 --data-dir ~/data --epochs 300 --schedule step
    python -m densenet.train --resume runs/densenet-digits/checkpoint.pt   # continue exactly

Writes to ``--out``: ``log.csv`` (one row per epoch), ``checkpoint.pt`` (atomically replaced each epoch:
model, optimizer, scheduler, epoch, RNG states, arguments) and ``final.json`` (final test accuracy).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inplace_abn.memory import parameters_of, saved_tensor_bytes
from trainkit import (
    ResumeError,
    atomic_save,
    check_same_args,
    load_checkpoint,
    progress,
    read_csv,
    rng_state,
    run_cli,
    seed_everything,
    set_rng_state,
    write_csv,
)

from .data import DataError, load_cifar10_tensors, load_digits_tensors
from .model import densenet_bc

__all__ = ["main", "build_parser", "ResumeError", "CSV_FIELDS"]

CSV_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "saved_mib")
CHECKPOINT_NAME = "checkpoint.pt"
# Arguments that must match between the run that wrote a checkpoint and the run resuming it.
_RESUME_MUST_MATCH = (
    "data", "image_size", "depth", "growth_rate", "norm", "memory", "drop_rate", "dtype", "batch_size",
    "epochs", "schedule", "lr", "weight_decay", "limit_train", "limit_test", "augment", "seed",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m densenet.train",
        description="Train DenseNet-BC (BatchNorm or In-Place ABN) on digits or a local CIFAR-10 copy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("digits", "cifar10"), default="digits")
    g.add_argument("--data-dir", default=None, help="cifar10: folder holding cifar-10-batches-py/ (never downloaded)")
    g.add_argument("--image-size", type=int, default=16, help="digits: 8x8 images are upsampled to this side")
    g.add_argument("--augment", choices=("auto", "on", "off"), default="auto",
                   help="random crop (pad 4) + horizontal flip; auto = on for cifar10, off for digits")
    g.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    g.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=40, help="DenseNet-BC depth, 6n+4")
    g.add_argument("--growth-rate", type=int, default=12)
    g.add_argument("--norm", default="iabn", help="bn or iabn (validated by the model)")
    g.add_argument("--memory", default="naive", help="naive, checkpoint, ... (validated by the model)")
    g.add_argument("--drop-rate", type=float, default=0.0)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=15)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--schedule", choices=("cosine", "step"), default="cosine",
                   help="cosine annealing to 0, or x0.1 at 50%% and 75%% of the epochs")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=os.path.join("runs", "densenet-digits"))
    g.add_argument("--resume", default=None, metavar="PATH", help="checkpoint.pt to continue from")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after epoch N (as if interrupted); continue later with --resume")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch only)")
    return p


# --------------------------------------------------------------------------------------------- helpers


def _load_checkpoint(path: str) -> Dict[str, Any]:
    return load_checkpoint(path, required=("model", "optimizer", "scheduler", "epoch", "rng", "args"),
                           kind="densenet.train", error=ResumeError, checkpoint_name=CHECKPOINT_NAME)


def _augment(x: Tensor) -> Tensor:
    """Random crop with 4-pixel zero padding + random horizontal flip (uses the global torch RNG)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (n,)).tolist()
    j = torch.randint(0, 9, (n,)).tolist()
    flip = (torch.rand(n) < 0.5).tolist()
    out = torch.empty_like(x)
    for k in range(n):
        crop = padded[k, :, i[k]:i[k] + h, j[k]:j[k] + w]
        out[k] = crop.flip(-1) if flip[k] else crop
    return out


def _batches(n: int, batch_size: int, shuffle: bool) -> Iterator[Tensor]:
    order = torch.randperm(n) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if shuffle and idx.numel() < 2:  # a single-sample training batch breaks batch norm
            break
        yield idx


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for idx in _batches(len(x), batch_size, shuffle=False):
        logits = model(x[idx])
        loss_sum += F.cross_entropy(logits, y[idx], reduction="sum").item()
        correct += (logits.argmax(1) == y[idx]).sum().item()
    return loss_sum / max(len(x), 1), correct / max(len(x), 1)


def measure_saved_mib(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """MiB autograd saves for backward for one training batch, parameters/buffers excluded.

    Runs on a deep copy with the RNG forked, so the real model's running statistics and the RNG stream
    (and hence exact resumption) are untouched.
    """
    probe = copy.deepcopy(model).train()
    with torch.random.fork_rng(devices=[]):
        total, loss, _ = saved_tensor_bytes(lambda: F.cross_entropy(probe(x.clone()), y), exclude=parameters_of(probe))
    return total / 2**20


def _make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    milestones = sorted({max(1, int(round(epochs * 0.5))), max(1, int(round(epochs * 0.75)))})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def _load_data(args: argparse.Namespace) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if args.data == "digits":
        xtr, ytr, xte, yte = load_digits_tensors(size=args.image_size, seed=args.seed)
    else:
        xtr, ytr, xte, yte = load_cifar10_tensors(args.data_dir)
    if args.limit_train is not None:
        xtr, ytr = xtr[: args.limit_train], ytr[: args.limit_train]
    if args.limit_test is not None:
        xte, yte = xte[: args.limit_test], yte[: args.limit_test]
    dtype = getattr(torch, args.dtype)
    return xtr.to(dtype), ytr, xte.to(dtype), yte


# ------------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Trains according to ``args``; returns the summary written to final.json (or a partial one on --stop-after)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2 (batch norm), got {args.batch_size}")
    ckpt = _load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        check_same_args(ckpt["args"], vars(args), _RESUME_MUST_MATCH, args.resume, error=ResumeError)

    seed_everything(args.seed)
    xtr, ytr, xte, yte = _load_data(args)
    if len(xtr) < 2 or len(xte) < 1:
        raise DataError(f"too little data: {len(xtr)} training / {len(xte)} test images")
    augment = args.augment == "on" or (args.augment == "auto" and args.data == "cifar10")
    dtype = getattr(torch, args.dtype)

    model = densenet_bc(args.depth, growth_rate=args.growth_rate, norm=args.norm, memory=args.memory,
                        drop_rate=args.drop_rate, num_classes=10).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    scheduler = _make_scheduler(optimizer, args.schedule, args.epochs)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "log.csv")
    ckpt_path = os.path.join(args.out, CHECKPOINT_NAME)

    start_epoch = 0
    elapsed = 0.0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
        except Exception as e:
            raise ResumeError(f"--resume checkpoint {args.resume!r} does not fit this model/optimizer "
                              f"({type(e).__name__}: {e})") from e
        start_epoch = int(ckpt["epoch"])
        elapsed = float(ckpt.get("elapsed", 0.0))
    rows = read_csv(csv_path, start_epoch) if ckpt is not None else []

    n_params = sum(p.numel() for p in model.parameters())
    mb = min(args.batch_size, len(xtr))
    saved_mib = measure_saved_mib(model, xtr[:mb], ytr[:mb])
    print(f"DenseNet-BC-{args.depth} k={args.growth_rate} norm={args.norm} memory={args.memory}: "
          f"{n_params:,} params, {saved_mib:.2f} MiB saved for backward per batch of {mb}; "
          f"{args.data}: {len(xtr)} train / {len(xte)} test images of {tuple(xtr.shape[1:])}"
          + (f"; resuming after epoch {start_epoch}" if ckpt is not None else ""), flush=True)

    last_epoch = start_epoch
    test_loss = test_acc = float("nan")
    if rows:
        test_loss, test_acc = float(rows[-1]["test_loss"]), float(rows[-1]["test_acc"])
    n_batches = math.ceil(len(xtr) / args.batch_size)
    for epoch in range(start_epoch + 1, args.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = progress(n_batches, f"epoch {epoch}/{args.epochs}", enabled=not args.no_progress)
        for idx in _batches(len(xtr), args.batch_size, shuffle=True):
            x, y = xtr[idx], ytr[idx]
            if augment:
                x = _augment(x)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        scheduler.step()
        test_loss, test_acc = evaluate(model, xte, yte)
        seconds = time.perf_counter() - t0
        elapsed += seconds
        rows.append({"epoch": epoch, "train_loss": f"{loss_sum / seen:.6f}", "train_acc": f"{correct / seen:.6f}",
                     "test_loss": f"{test_loss:.6f}", "test_acc": f"{test_acc:.6f}", "lr": f"{lr:.6g}",
                     "seconds": f"{seconds:.3f}", "saved_mib": f"{saved_mib:.4f}"})
        write_csv(csv_path, rows, CSV_FIELDS)
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "epoch": epoch, "rng": rng_state(),
                      "args": vars(args).copy(), "elapsed": elapsed}, ckpt_path)
        print(f"epoch {epoch}/{args.epochs}  train loss {loss_sum / seen:.4f} acc {correct / seen:.4f}  "
              f"test loss {test_loss:.4f} acc {test_acc:.4f}  lr {lr:.4g}  {seconds:.1f}s", flush=True)
        last_epoch = epoch
        if args.stop_after is not None and epoch >= args.stop_after and epoch < args.epochs:
            print(f"stopped after epoch {epoch}; continue with --resume {ckpt_path}", flush=True)
            return {"stopped_after": epoch, "test_acc": test_acc, "test_loss": test_loss}

    summary = {"test_acc": test_acc, "test_loss": test_loss, "epochs": last_epoch, "train_seconds": elapsed,
               "params": n_params, "saved_mib_per_batch": saved_mib, "args": vars(args).copy()}
    with open(os.path.join(args.out, "final.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"final test accuracy: {test_acc:.4f} ({test_acc * 100:.2f}%) after {last_epoch} epochs, "
          f"{elapsed:.1f}s of training", flush=True)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad data/checkpoint/option)."""
    return run_cli(build_parser(), run, argv, (DataError, ResumeError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
