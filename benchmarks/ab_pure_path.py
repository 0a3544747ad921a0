"""A/B of the pure-PyTorch path at several revisions, interleaved in one process (a tool for changes to it).

The pure path of a small layer is a chain of ~30 ATen calls, and a change to it typically moves a training
step by 0.5-2 %: less than the spread between two runs of ``bench_inplace_abn.py`` (about +-0.02 of the
ratio, mostly from the process's heap state, see below). Comparing two revisions in ONE process, with
their steps interleaved, removes that spread. Each revision's ``inplace_abn/`` package is exported with
``git archive`` (or copied from the working tree: ``worktree``) into a temporary folder and imported
under its own name; without the compiled extension beside it, each copy runs the pure-PyTorch path.

    python benchmarks/ab_pure_path.py HEAD~1 worktree
    python benchmarks/ab_pure_path.py 713f74e HEAD worktree --shape 8x32x28x28 --threads 2 --rounds 2000

Every round runs the baseline (``BatchNorm2d + LeakyReLU(inplace=True)``) and each revision once, in a
fresh seeded random order; a step is ``y = layer(x_leaf.clone()); y.backward(dy)`` as in
``bench_inplace_abn.py`` (same preparation, same timed region). Printed: the median step of each and its
ratio to the baseline. Nothing is written.

Heap state: glibc returns freed memory to the OS at its own pace (trimming), and a process then runs in
one of two regimes, one where every step's large allocations fault their pages in and one where they
do not. The regime is picked by chance per process and moves every ratio by ~0.1. ``--stable-heap``
(default) re-executes this script with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set so
that large blocks are reused: the regime without page faults, the harder one for the pure path.
``--no-stable-heap`` keeps the environment as it is (what ``bench_inplace_abn.py`` measures).
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from _provenance import ROOT, int_range, provenance

SLOPE = 0.01
_HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 28), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def export_package(revision: str, dest: Path) -> None:
    """Writes ``inplace_abn/`` of ``revision`` (a git revision, or ``worktree``) into ``dest``."""
    dest.mkdir(parents=True)
    if revision == "worktree":
        for path in (ROOT / "inplace_abn").rglob("*.py"):  # subpackages too (inplace_abn.memory_report)
            target = dest / path.relative_to(ROOT / "inplace_abn")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        return
    try:
        archive = subprocess.run(
            ["git", "archive", revision, "inplace_abn"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"git archive {revision!r} failed: {exc.stderr.decode().strip()}") from None
    subprocess.run(["tar", "-x", "--strip-components=1", "-C", str(dest)], input=archive, check=True)


def load_layers(revisions: Sequence[str], tmp: Path, channels: int) -> dict[str, nn.Module]:
    """One InPlaceABN per revision, each from its own copy of the package, on the pure-PyTorch path."""
    sys.path.insert(0, str(tmp))
    # The copies have no compiled extension: make that their choice, not an error (CI exports =cpp).
    os.environ["INPLACE_ABN_BACKEND"] = "python"
    layers: dict[str, nn.Module] = {}
    for i, revision in enumerate(revisions):
        name = f"inplace_abn_ab{i}"
        export_package(revision, tmp / name)
        package = importlib.import_module(name)
        if package.get_backend() != "python":
            raise SystemExit(f"{revision}: expected the pure-PyTorch backend, got {package.get_backend()!r}")
        layers[revision] = package.InPlaceABN(channels, activation="leaky_relu", activation_param=SLOPE)
    return layers


def step(layer: nn.Module, x_leaf: torch.Tensor, dy: torch.Tensor) -> float:
    """Seconds of one training step (the preparation is untimed)."""
    layer.zero_grad(set_to_none=True)
    x_leaf.grad = None
    inp = x_leaf.clone()
    t0 = time.perf_counter()
    y = layer(inp)
    y.backward(dy)
    return time.perf_counter() - t0


def run(layers: dict[str, nn.Module], shape: Sequence[int], rounds: int, seed: int) -> dict[str, list[float]]:
    torch.manual_seed(seed)
    x_leaf = torch.randn(*shape).requires_grad_()
    dy = torch.randn(*shape)
    rng = random.Random(seed)
    names = list(layers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    warmup = max(rounds // 10, 3)
    for r in range(warmup + rounds):
        rng.shuffle(names)
        for name in names:
            seconds = step(layers[name], x_leaf, dy)
            if r >= warmup:
                samples[name].append(seconds)
        if (r + 1) % max((warmup + rounds) // 10, 1) == 0:
            print(f"  {r + 1}/{warmup + rounds} rounds", file=sys.stderr, flush=True)
    return samples


def parse_shape(text: str) -> list[int]:
    try:
        shape = [int(s) for s in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must look like 8x32x28x28, got {text!r}") from None
    if len(shape) < 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape needs >= 3 positive sizes (N, C, *), got {text!r}")
    return shape


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revisions", nargs="+", help="git revisions, or 'worktree' for the working tree")
    parser.add_argument("--shape", type=parse_shape, default=[8, 32, 28, 28], help="NxCxHxW (default 8x32x28x28)")
    parser.add_argument("--threads", type=int_range(1), default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--rounds", type=int_range(1), default=2000, help="timed rounds (default 2000)")
    parser.add_argument("--seed", type=int_range(0, 2**63 - 1), default=0)
    parser.add_argument("--stable-heap", action=argparse.BooleanOptionalAction, default=True,
                        help="re-execute with large-block reuse (see the module docstring; default on)")  # fmt: skip
    args = parser.parse_args(argv)
    if len(set(args.revisions)) != len(args.revisions):
        parser.error(f"revisions must be distinct, got {args.revisions}")
    if args.stable_heap and any(os.environ.get(k) != v for k, v in _HEAP_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_HEAP_ENV})
    torch.set_num_threads(args.threads)
    info = provenance()
    print(f"[ab] {info['machine']}  torch {info['torch_version']}  at {info['git_rev']}  {info['date']}  "
          f"shape {'x'.join(map(str, args.shape))}  threads {args.threads}  rounds {args.rounds}  "
          f"stable heap {args.stable_heap}")  # fmt: skip
    baseline = "BatchNorm2d+LeakyReLU(inplace)"
    with tempfile.TemporaryDirectory(prefix="inplace_abn_ab_") as tmp:
        layers = {baseline: nn.Sequential(nn.BatchNorm2d(args.shape[1]), nn.LeakyReLU(SLOPE, inplace=True))}
        layers.update(load_layers(args.revisions, Path(tmp), args.shape[1]))
        samples = run(layers, args.shape, args.rounds, args.seed)
    base = statistics.median(samples[baseline])
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"  {name:40s} median {median * 1e3:7.3f} ms  x{median / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
