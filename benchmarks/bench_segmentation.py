"""Segmentation models: training memory and CPU time of BatchNorm vs In-Place ABN.

Networks: WiderResNet-38 A2 and ResNet-50 (dilated) + DeepLabV3, 19 classes (``segmentation.build_model``).

* Memory: the exact bytes autograd keeps for backward after one training forward of the model
  (``inplace_abn.memory.saved_tensor_bytes``; parameters, buffers and the input image excluded; the loss is
  not included: its log-softmax is the same for both norms), counted on ``device="meta"`` (nothing is
  allocated, so full-width models at 2 x 3 x 512 x 512 and 1 x 3 x 1024 x 1024 cost nothing).
* Batch that fits an activation budget (default 16 GiB at a 512 x 512 crop): saved bytes are linear in
  the batch, so batch 1 and 2 give bytes = fixed + per_image * batch; the largest batch under the budget
  is then measured directly (it fits, one more does not).
* Time: CPU forward + backward of a training step (loss = sum of the logits), norm=bn vs iabn built
  with the same seed, interleaved in one process (order flipped every round), medians, per thread count.
  Full run: width 0.5 at 1 x 3 x 256 x 256 (width 1.0 WRN-38 takes seconds per step on a CPU). The quick
  run's tiny layers (width 0.125, 64 px) are dominated by the fixed per-call cost of each layer, so its
  time ratio is a smoke test, not a measurement.

Run (from the repository root)::

    python benchmarks/bench_segmentation.py            # full: OS 16 and 8, both crops, timing at width 0.5, 256 px
    python benchmarks/bench_segmentation.py --quick    # CI: OS 16, tiny timing run (< 1 minute)

Writes ``benchmarks/results/segmentation_memory.csv``, ``segmentation_batch.csv``,
``segmentation_time.csv`` (rows appended, one ``run_id`` per run) and ``segmentation_memory.png``.
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
from _provenance import append_csv, float_range, int_list, int_range, provenance  # noqa: E402  (benchmarks/, on sys.path as the script's folder)

import inplace_abn  # noqa: E402
from inplace_abn.memory import parameters_of, saved_tensor_bytes  # noqa: E402
from segmentation import build_model  # noqa: E402
from segmentation.models import MaxPool2d  # noqa: E402

ARCHS: tuple[str, ...] = ("wrn38", "resnet50")
NORMS: tuple[str, ...] = ("bn", "iabn")
CROPS: tuple[tuple[int, int], ...] = ((2, 512), (1, 1024))  # (batch, square crop size)
NUM_CLASSES = 19
GIB = 2.0**30
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------- provenance


# ---------------------------------------------------------------------------------------------- memory


def meta_model(arch: str, norm: str, output_stride: int) -> torch.nn.Module:
    """Full-width ``arch`` + DeepLabV3 on the meta device, training mode."""
    with torch.device("meta"):
        return build_model(arch, NUM_CLASSES, norm=norm, output_stride=output_stride).train()


def with_stock_pooling(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every lean ``segmentation.models.MaxPool2d`` replaced by ``nn.MaxPool2d`` (which keeps its
    input and int64 indices): the memory of the same network built from stock PyTorch pooling."""
    for name, child in model.named_children():
        if isinstance(child, MaxPool2d):
            setattr(model, name, torch.nn.MaxPool2d(child.kernel_size, child.stride, child.padding))
        else:
            with_stock_pooling(child)
    return model


def saved_bytes(model: torch.nn.Module, batch: int, size: int) -> int:
    """Exact bytes saved for backward by one training forward on a (batch, 3, size, size) meta input."""
    x = torch.empty(batch, 3, size, size, device="meta", requires_grad=True)
    total, _, _ = saved_tensor_bytes(lambda: model(x), exclude=parameters_of(model) + [x])
    return total


def largest_batch(model: torch.nn.Module, size: int, budget: int) -> tuple[int, int, int, int]:
    """Largest batch whose saved bytes fit ``budget``: (batch, its bytes, per-image bytes, fixed bytes).

    Bytes are linear in the batch (every saved tensor has the batch dimension, up to a few
    batch-independent scalars): solved from batches 1 and 2, then checked by measuring the answer and
    the answer + 1.
    """
    one, two = saved_bytes(model, 1, size), saved_bytes(model, 2, size)
    per_image, fixed = two - one, 2 * one - two
    batch = max(0, (budget - fixed) // per_image)
    while batch > 0 and saved_bytes(model, batch, size) > budget:  # never taken when exactly linear
        batch -= 1
    while saved_bytes(model, batch + 1, size) <= budget:
        batch += 1
    return batch, saved_bytes(model, batch, size) if batch else 0, per_image, fixed


# ------------------------------------------------------------------------------------------------ time


def _step(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x).sum().backward()
    return time.perf_counter() - start


def time_pair(
    arch: str, output_stride: int, width: float, size: int, threads: int, rounds: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per training step of norm=bn and norm=iabn (same seed), interleaved, per round."""
    torch.set_num_threads(threads)
    models = {}
    for norm in NORMS:
        torch.manual_seed(0)
        models[norm] = build_model(arch, NUM_CLASSES, norm=norm, output_stride=output_stride, width=width).train()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    for _ in range(warmup):
        for norm in NORMS:
            _step(models[norm], x)
    samples: dict[str, list[float]] = {n: [] for n in NORMS}
    for r in range(rounds):
        for norm in NORMS if r % 2 == 0 else tuple(reversed(NORMS)):
            samples[norm].append(_step(models[norm], x))
    return samples


def quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], statistics.median(samples), q[2]


# ------------------------------------------------------------------------------------------------ plot


def plot(mem: dict[tuple[str, int, int, int, str], int], strides: Sequence[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[segmentation] matplotlib not installed: no plot (pip install matplotlib)")
        return False
    groups = [(a, s, b, c) for s in strides for a in ARCHS for b, c in CROPS]
    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * len(groups)), 4.4))
    w = 0.38
    for k, (norm, color) in enumerate((("bn", "#888888"), ("iabn", "#1f77b4"))):
        xs = [i + (k - 0.5) * w for i in range(len(groups))]
        ys = [mem[(a, s, b, c, norm)] / GIB for a, s, b, c in groups]
        bars = ax.bar(xs, ys, w, color=color, label="BatchNorm2d + LeakyReLU" if norm == "bn" else "In-Place ABN")
        if norm == "iabn":
            for bar, (a, s, b, c) in zip(bars, groups):
                ratio = mem[(a, s, b, c, "iabn")] / mem[(a, s, b, c, "bn")]
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + w / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{a}\nOS{s}, {b}x{c}x{c}" for a, s, b, c in groups], fontsize=8)
    ax.set_ylabel("saved for backward (GiB)")
    ax.set_title("DeepLabV3 training memory (exact saved tensors, 19 classes)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI: output stride 16 only, tiny timing run")
    parser.add_argument(
        "--budget-gib", type=float_range(0, low_open=True), default=16.0, help="activation budget for the batch fit"
    )
    parser.add_argument("--budget-size", type=int_range(16), default=512, help="crop size of the batch fit")
    parser.add_argument(
        "--time-width",
        type=float_range(0, low_open=True),
        default=None,
        help="width of the timed models (0.5; quick 0.125)",
    )
    parser.add_argument("--time-size", type=int_range(16), default=None, help="timed input 1x3xSxS (256; quick 64)")
    parser.add_argument("--rounds", type=int_range(1), default=None, help="timing rounds (default 12, quick 3)")
    parser.add_argument(
        "--threads", type=int_list(1), default=None, help="comma-separated thread counts (default 1,2; quick 2)"
    )
    parser.add_argument("--no-time", action="store_true", help="skip the CPU timing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)

    quick = args.quick
    strides = (16,) if quick else (16, 8)
    width = args.time_width or (0.125 if quick else 0.5)
    size = args.time_size or (64 if quick else 256)
    rounds = args.rounds or (3 if quick else 12)
    threads_list = args.threads or ([2] if quick else [1, 2])
    prov = provenance()
    mode = "quick" if quick else "full"
    print(f"[segmentation] run {prov['run_id']} ({mode}) on {prov['machine']}, torch {prov['torch_version']}, "
          f"inplace_abn backend {inplace_abn.get_backend()}")  # fmt: skip

    # ---- memory (pool "lean": the models as built; "stock": the same with nn.MaxPool2d, for reference)
    mem: dict[tuple[str, int, int, int, str], int] = {}
    stock: dict[tuple[str, int, int, int, str], int] = {}
    mem_rows: list[dict[str, object]] = []
    for s in strides:
        for arch in ARCHS:
            for pool, table in (("lean", mem), ("stock", stock)):
                models = {norm: meta_model(arch, norm, s) for norm in NORMS}
                if pool == "stock":
                    models = {norm: with_stock_pooling(m) for norm, m in models.items()}
                for b, c in CROPS:
                    for norm in NORMS:
                        table[(arch, s, b, c, norm)] = saved_bytes(models[norm], b, c)
                    for norm in NORMS:
                        v = table[(arch, s, b, c, norm)]
                        mem_rows.append({
                            "run_id": prov["run_id"], "mode": mode, "arch": arch, "head": "deeplabv3",
                            "output_stride": s, "pool": pool, "norm": norm, "batch": b, "size": c,
                            "saved_bytes": v, "saved_gib": round(v / GIB, 4),
                            "ratio_vs_bn": round(v / table[(arch, s, b, c, "bn")], 4),
                            **{k: prov[k] for k in ("machine", "torch_version", "git_rev", "date")},
                        })  # fmt: skip

    # ---- batch that fits the budget
    budget = int(args.budget_gib * GIB)
    fit_rows: list[dict[str, object]] = []
    fits: dict[tuple[str, int, str], int] = {}
    for s in strides:
        for arch in ARCHS:
            for norm in NORMS:
                batch, used, per_image, fixed = largest_batch(meta_model(arch, norm, s), args.budget_size, budget)
                fits[(arch, s, norm)] = batch
                fit_rows.append({
                    "run_id": prov["run_id"], "mode": mode, "arch": arch, "output_stride": s, "norm": norm,
                    "size": args.budget_size, "budget_gib": args.budget_gib, "per_image_bytes": per_image,
                    "fixed_bytes": fixed, "max_batch": batch, "saved_bytes_at_max": used,
                    **{k: prov[k] for k in ("machine", "torch_version", "git_rev", "date")},
                })  # fmt: skip

    print(f"\n### Saved for backward (GiB, exact, meta device) and batch within {args.budget_gib:g} GiB "
          f"at {args.budget_size}x{args.budget_size}\n")  # fmt: skip
    crop_cols = " | ".join(f"{b}x3x{c}x{c} bn | iabn | ratio" for b, c in CROPS)
    print(f"| model | OS | {crop_cols} | batch bn | batch iabn |")
    print("|---|---|" + "---|---|---|" * len(CROPS) + "---|---|")
    for s in strides:
        for arch in ARCHS:
            cells = []
            for b, c in CROPS:
                bn, ia = mem[(arch, s, b, c, "bn")], mem[(arch, s, b, c, "iabn")]
                cells.append(f"{bn / GIB:.2f} | {ia / GIB:.2f} | {ia / bn:.3f}")
            print(f"| {arch} + DeepLabV3 | {s} | " + " | ".join(cells)
                  + f" | {fits[(arch, s, 'bn')]} | {fits[(arch, s, 'iabn')]} |")  # fmt: skip

    print("\nSame networks with stock nn.MaxPool2d (keeps its input and int64 indices) instead of the lean pooling:")
    for s in strides:
        for arch in ARCHS:
            b, c = CROPS[0]
            bn, ia = stock[(arch, s, b, c, "bn")], stock[(arch, s, b, c, "iabn")]
            print(
                f"    {arch} OS{s} {b}x3x{c}x{c}: bn {bn / GIB:.2f} GiB, iabn {ia / GIB:.2f} GiB, ratio {ia / bn:.3f}"
            )

    append_csv(args.out / "segmentation_memory.csv", mem_rows)
    append_csv(args.out / "segmentation_batch.csv", fit_rows)
    if plot(mem, strides, args.out / "segmentation_memory.png"):
        print(f"\n[segmentation] plot: {args.out / 'segmentation_memory.png'}")

    # ---- time
    if not args.no_time:
        time_rows: list[dict[str, object]] = []
        print(f"\n### CPU training step (forward + backward), width {width:g}, 1x3x{size}x{size}, OS 16, "
              f"median of {rounds} interleaved rounds\n")  # fmt: skip
        print("| model | threads | bn (ms) | iabn (ms) | iabn / bn |")
        print("|---|---|---|---|---|")
        for arch in ARCHS:
            for threads in threads_list:
                samples = time_pair(arch, 16, width, size, threads, rounds)
                q = {n: quantiles(v) for n, v in samples.items()}
                ratio = q["iabn"][1] / q["bn"][1]
                print(f"| {arch} + DeepLabV3 | {threads} | {q['bn'][1] * 1e3:.1f} | {q['iabn'][1] * 1e3:.1f} "
                      f"| {ratio:.3f} |", flush=True)  # fmt: skip
                for norm in NORMS:
                    p25, med, p75 = q[norm]
                    time_rows.append({
                        "run_id": prov["run_id"], "mode": mode, "arch": arch, "output_stride": 16, "norm": norm,
                        "width": width, "batch": 1, "size": size, "threads": threads, "rounds": rounds,
                        "median_ms": round(med * 1e3, 3), "p25_ms": round(p25 * 1e3, 3),
                        "p75_ms": round(p75 * 1e3, 3), "ratio_vs_bn": round(med / q["bn"][1], 4),
                        "backend": inplace_abn.get_backend(),
                        **{k: prov[k] for k in ("machine", "torch_version", "git_rev", "date")},
                    })  # fmt: skip
        append_csv(args.out / "segmentation_time.csv", time_rows)
    print(f"\n[segmentation] results appended under {args.out} (run_id {prov['run_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
