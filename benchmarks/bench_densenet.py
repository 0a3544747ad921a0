"""DenseNet memory and time: naive vs checkpoint vs efficient, BatchNorm vs In-Place ABN.

Memory is the exact number of bytes autograd keeps for backward after one training forward
(``inplace_abn.memory.saved_tensor_bytes``, parameters and buffers excluded), counted on
``device="meta"``: no allocation, so ImageNet-size models at batch 64 cost nothing. For the checkpoint
mode this is a lower bound (the inputs kept alive by the recompute closure are not saved tensors).

Run (from the repository root)::

    python benchmarks/bench_densenet.py                    # memory sweep + ImageNet table + CPU time + plot
    python benchmarks/bench_densenet.py --quick            # smaller sweep, fewer timing rounds

Writes ``benchmarks/results/densenet_memory.csv``, ``densenet_time.csv`` and ``densenet_memory.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _provenance import append_csv, int_range, provenance  # noqa: E402  (benchmarks/, on sys.path as the script's folder)

from densenet import densenet121, densenet169, densenet201, densenet264, densenet_bc  # noqa: E402
from inplace_abn.memory import parameters_of, saved_tensor_bytes  # noqa: E402

CONFIGS: tuple[tuple[str, str], ...] = (
    ("naive", "bn"),
    ("checkpoint", "bn"),
    ("naive", "iabn"),
    ("efficient", "iabn"),
)
MIB = 2.0**20
RESULTS = ROOT / "benchmarks" / "results"


def saved_mib(model: torch.nn.Module, batch: int, size: int) -> float:
    """MiB saved for backward by one training forward of ``model`` on a (batch, 3, size, size) meta input."""
    model = model.to("meta").train()
    x = torch.empty(batch, 3, size, size, device="meta", requires_grad=True)
    total, _, _ = saved_tensor_bytes(lambda: model(x), exclude=parameters_of(model) + [x])
    return total / MIB


def memory_sweep(depths: Sequence[int], batch: int = 8, size: int = 32) -> dict[tuple[str, str], list[float]]:
    """Saved MiB of DenseNet-BC (k=12) per (memory, norm) config and depth."""
    out: dict[tuple[str, str], list[float]] = {}
    for memory, norm in CONFIGS:
        out[(memory, norm)] = [saved_mib(densenet_bc(d, memory=memory, norm=norm), batch, size) for d in depths]
    return out


def fit(depths: Sequence[int], mib: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares fit mib = a*L^2 + b*L + c over the number of dense layers L = depth - 4."""
    import numpy as np

    layers = np.asarray(depths, dtype=float) - 4
    a, b, c = np.polyfit(layers, np.asarray(mib, dtype=float), 2)
    return float(a), float(b), float(c)


def time_step(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x).sum().backward()
    return time.perf_counter() - start


def time_compare(depth: int, batch: int, rounds: int, threads: int) -> dict[str, float]:
    """Median seconds of a training step per config, interleaved in one process (order flipped per round)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    models = {f"{m}/{n}": densenet_bc(depth, memory=m, norm=n).train() for m, n in CONFIGS}
    x = torch.randn(batch, 3, 32, 32)
    samples: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for _ in range(2):  # warm-up
        for k in names:
            time_step(models[k], x)
    for r in range(rounds):
        for k in names if r % 2 == 0 else reversed(names):
            samples[k].append(time_step(models[k], x))
    return {k: statistics.median(v) for k, v in samples.items()}


def _provenance() -> dict[str, str]:
    """This file's CSV columns (machine, torch, git_rev, date) from the shared provenance."""
    p = provenance()
    return {"machine": p["machine"], "torch": p["torch_version"], "git_rev": p["git_rev"], "date": p["date"]}


def _plot(depths: Sequence[int], sweep: dict[tuple[str, str], list[float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[densenet] matplotlib not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (memory, norm), mib in sweep.items():
        ax.plot(depths, mib, marker="o", label=f"{memory} / {norm}")
    ax.set_xlabel("DenseNet-BC depth (k=12, batch 8, 32x32)")
    ax.set_ylabel("saved for backward (MiB)")
    ax.set_title("Training memory vs depth")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sweep and fewer timing rounds")
    parser.add_argument("--time-depth", type=int_range(10), default=40, help="DenseNet-BC depth of the timing run")
    parser.add_argument("--rounds", type=int_range(1), default=None, help="timing rounds (default 10, quick 4)")
    parser.add_argument("--no-time", action="store_true", help="skip the CPU timing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)

    depths = [40, 70, 100, 160] if args.quick else [40, 64, 100, 130, 160, 190, 220, 250]
    prov = _provenance()
    print(f"[densenet] memory sweep over depths {depths} (meta device, exact saved bytes)")
    sweep = memory_sweep(depths)
    rows: list[dict[str, object]] = []
    print(f"{'depth':>6} " + " ".join(f"{m + '/' + n:>16}" for m, n in CONFIGS))
    for i, d in enumerate(depths):
        print(f"{d:>6} " + " ".join(f"{sweep[c][i]:>16.1f}" for c in CONFIGS))
        for m, n in CONFIGS:
            rows.append({"model": f"densenet_bc{d}", "memory": m, "norm": n, "batch": 8, "size": 32,
                         "saved_mib": round(sweep[(m, n)][i], 3), **prov})  # fmt: skip
    print("[densenet] fit saved MiB = a*L^2 + b*L + c (L = dense layers = depth - 4):")
    for c in CONFIGS:
        a, b, c0 = fit(depths, sweep[c])
        print(f"    {c[0] + '/' + c[1]:>16}: a={a:.4f}  b={b:.3f}  c={c0:.1f}")
    last = len(depths) - 1
    eff = sweep[("efficient", "iabn")][last]
    print(
        f"[densenet] depth {depths[last]}: efficient/iabn = {eff / sweep[('checkpoint', 'bn')][last]:.3f}x "
        f"checkpoint/bn (target <= 0.70), {eff / sweep[('naive', 'bn')][last]:.3f}x naive/bn (target <= 0.13)"
    )
    print("[densenet] ImageNet size, batch 64, 224x224:")
    for name, factory in (("densenet121", densenet121), ("densenet169", densenet169),
                          ("densenet201", densenet201), ("densenet264", densenet264)):  # fmt: skip
        values = {c: saved_mib(factory(memory=c[0], norm=c[1]), 64, 224) / 1024 for c in CONFIGS}
        print(f"    {name:>12}: " + "  ".join(f"{c[0]}/{c[1]} {v:.2f} GiB" for c, v in values.items()))
        for c, v in values.items():
            rows.append({"model": name, "memory": c[0], "norm": c[1], "batch": 64, "size": 224,
                         "saved_mib": round(v * 1024, 3), **prov})  # fmt: skip
    append_csv(args.out / "densenet_memory.csv", rows)
    if _plot(depths, sweep, args.out / "densenet_memory.png"):
        print(f"[densenet] plot: {args.out / 'densenet_memory.png'}")

    if not args.no_time:
        rounds = args.rounds or (4 if args.quick else 10)
        time_rows: list[dict[str, object]] = []
        for threads in (1, 2):
            med = time_compare(args.time_depth, 16, rounds, threads)
            eff = med["efficient/iabn"]
            print(f"[densenet] time, densenet_bc{args.time_depth} batch 16, {threads} thread(s), median of {rounds}:")
            for k, v in med.items():
                print(f"    {k:>16}: {v * 1e3:8.1f} ms")
            print(f"    efficient/iabn = {eff / med['naive/bn']:.3f}x naive/bn (target <= 1.15), "
                  f"{eff / med['checkpoint/bn']:.3f}x checkpoint/bn (target <= 1.0)")  # fmt: skip
            for k, v in med.items():
                time_rows.append({"model": f"densenet_bc{args.time_depth}", "config": k, "threads": threads,
                                  "batch": 16, "median_ms": round(v * 1e3, 3), **prov})  # fmt: skip
        append_csv(args.out / "densenet_time.csv", time_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
