"""The fused residual layer (issue 14): one layer, and whole ResNet training steps against what users pick instead.

Two parts, each appending rows to its CSV under ``benchmarks/results/`` (machine, torch, git revision, date):

``layer`` (``bench_residual_layer.csv``): ``act(BN(x) + r)`` forward + backward, training, float32:

* ``BatchNorm2d+add+ReLU(inplace)``: the torchvision block ending (the reference for every ratio),
* ``InPlaceABN(identity)+add+LeakyReLU(inplace)``: what convert_model did before the fusion,
* ``InPlaceABN(x, residual)``: the fused layer (leaky_relu 0.01).

Times are medians of interleaved rounds in one process (order flipped every round) at 1 and 2 threads;
saved bytes are exact (``saved_tensor_bytes``, parameters excluded) in activations of x, not counting the
residual: in a block it is the block input, which the block's first convolution keeps anyway.

``models`` (``bench_residual_models.csv`` and ``bench_residual_models.png``): one training step (forward,
cross-entropy, backward) of torchvision's resnet50 and deeplabv3_resnet50 (random init, no download) in:

* ``bn eager``; ``bn compile`` (inductor, default); ``bn compile budget=B`` (inductor with
  ``torch._functorch.config.activation_memory_budget = B``); ``bn checkpoint`` (``torch.utils.checkpoint``
  around each of the four stages);
* ``iabn eager`` (``convert_model``: fused residual layers, ReLU -> leaky_relu 0.01, ``RecomputeMaxPool2d``)
  and the same under ``torch.compile``, default and with each budget; ``iabn eager nn.MaxPool2d``
  (``recompute_max_pool=False``: the stock max-pool, which keeps its int64 indices).

Memory per sample is the slope of the memory a forward keeps for backward between two batch sizes (so
batch-independent tensors such as compiled weight-layout copies cancel): the exact saved-for-backward
bytes (``saved_tensor_bytes``; it sees what ``torch.utils.checkpoint`` keeps too, since that also goes
through saved-tensor hooks), and with ``--rss`` the resident memory a forward adds as a cross-check
(process re-executed with ``MALLOC_MMAP_THRESHOLD_=65536``, so every large tensor is its own mapping:
docs/measuring.md; every allocation then page-faults, so the times of such a run are not comparable and
are marked ``allocator_pinned``). Step time is the median of interleaved rounds at the small batch.
Gradients: every variant's float32 parameter gradients are compared with a float64 eager run of the same
function (the BatchNorm model for ``bn``; ``to_batchnorm`` of the converted model in float64, i.e.
BatchNorm + add + leaky ReLU, for ``iabn``): the relative error of all parameter gradients together,
||g - g64|| / ||g64|| over their concatenation. Through 50
BatchNorm layers at small batch and resolution that difference is large even for the plain float32 eager
model (the statistics of a 2x2 map over 2 images are ill-conditioned), so the float32 eager model's own
difference is the floor, and a variant is marked when its difference exceeds twice the floor of its kind.

Run from the repository root (needs torchvision; compiling takes minutes per variant on 2 CPU cores)::

    python benchmarks/bench_residual.py layer
    python benchmarks/bench_residual.py models                      # 224x224, batches 2 and 4
    python benchmarks/bench_residual.py models --quick              # CI size: 64x64, fewer rounds
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo.config  # the compiled variants' cache settings (bench_models)
import torch._inductor.config
import torch.nn as nn
import torch.nn.functional as F

try:  # the installed package (CI installs a built copy next to an unbuilt source tree: do not shadow it)
    import inplace_abn  # noqa: F401
except ImportError:  # a bare checkout: the source tree (pure-PyTorch backend unless built in place)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _provenance import append_csv, float_range, int_range, provenance  # noqa: E402  (benchmarks/, the script's folder)

from inplace_abn import InPlaceABN  # noqa: E402
from inplace_abn.convert import convert_model, to_batchnorm  # noqa: E402
from inplace_abn.memory import parameters_of, saved_tensor_bytes  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - optional
    tqdm = None

RESULTS = Path(__file__).resolve().parent / "results"
GRAD_FLOOR_FACTOR = 2.0


def _shape(text: str) -> tuple[int, ...]:
    """``--shapes`` entry ``NxCxHxW`` (positive sizes)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected a shape such as 8x32x28x28 (>= 3 positive sizes), got {text!r}")
    return shape


def _progress(items, desc: str):
    return tqdm(items, desc=desc, leave=False) if tqdm is not None else items


# --------------------------------------------------------------------------------------------------
# Part 1: one layer
# --------------------------------------------------------------------------------------------------


class _BNAddReLU(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(channels), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        out += r
        return self.act(out)


class _IdentityAddLeaky(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn, self.act = InPlaceABN(channels, activation="identity"), nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x) + r)  # out of place: the identity layer keeps its output


class _Fused(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = InPlaceABN(channels)

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.bn(x, residual=r)


LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "BatchNorm2d+add+ReLU(inplace)": _BNAddReLU,
    "InPlaceABN(identity)+add+LeakyReLU(inplace)": _IdentityAddLeaky,
    "InPlaceABN(x, residual)": _Fused,
}


def bench_layer(args: argparse.Namespace) -> None:
    rows = []
    meta = provenance()
    for shape in args.shapes:
        shape_text = "x".join(map(str, shape))
        torch.manual_seed(0)
        x_leaf = torch.randn(shape, requires_grad=True)
        r_leaf = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        layers = {name: make(shape[1]) for name, make in LAYERS.items()}
        saved = {}
        for name, layer in layers.items():
            r = r_leaf * 1.0  # the block input: a non-leaf, kept by the block's first convolution anyway
            total, _, _ = saved_tensor_bytes(
                lambda layer=layer, r=r: layer(x_leaf * 1.0, r), exclude=parameters_of(layer) + [r]
            )
            saved[name] = total / (x_leaf.numel() * x_leaf.element_size())
        for threads in args.threads:
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {name: [] for name in layers}

            def step(layer: nn.Module) -> float:
                x, r = x_leaf.detach().clone(), r_leaf.detach().clone().requires_grad_()
                x.requires_grad_()
                inp = x * 1.0  # a non-leaf input, as a conv output is
                start = time.perf_counter()
                layer(inp, r).backward(dy)
                return time.perf_counter() - start

            for layer in layers.values():  # warm-up
                for _ in range(3):
                    step(layer)
            names = list(layers)
            for i in _progress(range(args.rounds), f"{shape_text} threads={threads}"):
                for name in names if i % 2 == 0 else names[::-1]:
                    times[name].append(step(layers[name]))
            base = statistics.median(times[names[0]])
            for name in names:
                median = statistics.median(times[name])
                rows.append({
                    **meta, "shape": shape_text, "threads": threads, "variant": name, "rounds": args.rounds,
                    "median_ms": f"{median * 1e3:.4f}", "ratio": f"{median / base:.3f}",
                    "saved_activations": f"{saved[name]:.3f}",
                })  # fmt: skip
                print(f"{shape_text:>16} threads={threads} {name:<46} {median * 1e3:9.3f} ms  "
                      f"{median / base:5.3f}x  saved {saved[name]:.2f} activations")  # fmt: skip
    append_csv(args.out or RESULTS / "bench_residual_layer.csv", rows)


# --------------------------------------------------------------------------------------------------
# Part 2: whole models
# --------------------------------------------------------------------------------------------------


def _torchvision_models() -> dict[str, Callable[[], nn.Module]]:
    try:
        from torchvision.models import resnet50
        from torchvision.models.segmentation import deeplabv3_resnet50
    except Exception as exc:  # noqa: BLE001 - any import failure means: no torchvision here
        raise SystemExit(f"bench_residual.py models needs torchvision usable with this torch ({exc})") from exc
    return {
        "resnet50": lambda: resnet50(weights=None),
        "deeplabv3_resnet50": lambda: deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=False),
    }


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _logits_of(model(x))


def _stages(model: nn.Module) -> nn.Module:
    """The module holding layer1..layer4 (the model itself, or a segmentation model's backbone)."""
    return getattr(model, "backbone", model)


class _Checkpointed(nn.Module):
    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.stage, x, use_reentrant=False)


def _checkpoint_stages(model: nn.Module) -> nn.Module:
    holder = _stages(model)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        setattr(holder, name, _Checkpointed(getattr(holder, name)))
    return model


def _compiled(model: nn.Module, budget: float | None) -> Callable:
    """``model`` under torch.compile (inductor, fullgraph=True), partitioned with
    ``activation_memory_budget = budget``.

    fullgraph=True: the whole step is one graph, for the BatchNorm model as without it; for the fused model it
    also admits the fused layer's decision op, whose output size depends on the data (without fullgraph, dynamo
    splits the graph there, at every fused layer). Each variant compiles its own fresh function: dynamo caches compiled code per code object and, with
    nn modules inlined, would reuse one variant's graph (and its budget) for another instance of the same
    architecture.
    """
    import torch._functorch.config as functorch_config  # the documented knob of the activation-memory budget

    namespace: dict[str, Callable] = {}
    exec("def step(model, x):\n    return model(x)\n", namespace)  # a new code object per variant
    compiled = torch.compile(namespace["step"], fullgraph=True)

    def run(x: torch.Tensor) -> torch.Tensor:
        with functorch_config.patch(activation_memory_budget=1.0 if budget is None else budget):
            return _logits_of(compiled(model, x))

    return run


def _logits_of(out) -> torch.Tensor:
    return out["out"] if isinstance(out, dict) else out


def nontrivial_batchnorm(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` (seed 0) with non-trivial BatchNorm parameters: weight U(0.5, 1.5), bias U(-0.2, 0.2)."""
    torch.manual_seed(0)
    model = factory()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _variants(
    factory: Callable[[], nn.Module], budgets: list[float]
) -> tuple[dict[str, tuple[Callable, nn.Module, str]], dict[str, nn.Module]]:
    """(name -> (forward function, module owning the parameters, kind), kind -> float64 eager reference)."""
    bn = nontrivial_batchnorm(factory)  # shared by every variant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        iabn = convert_model(copy.deepcopy(bn))
        iabn_pool = convert_model(copy.deepcopy(bn), recompute_max_pool=False)
    # float64 references of both functions: BatchNorm + ReLU, and BatchNorm + add + leaky ReLU (to_batchnorm
    # of the float64 converted model, so that |w| + eps is formed in float64).
    references = {"bn": copy.deepcopy(bn).double(), "iabn": to_batchnorm(copy.deepcopy(iabn).double())}
    ckpt = _checkpoint_stages(copy.deepcopy(bn))
    out: dict[str, tuple[Callable, nn.Module, str]] = {
        "bn eager": (lambda x, m=bn: _logits(m, x), bn, "bn"),
        "bn checkpoint": (lambda x, m=ckpt: _logits(m, x), ckpt, "bn"),
        "iabn eager": (lambda x, m=iabn: _logits(m, x), iabn, "iabn"),
        # the same without RecomputeMaxPool2d: what recomputing the stem's max-pool costs and saves
        "iabn eager nn.MaxPool2d": (lambda x, m=iabn_pool: _logits(m, x), iabn_pool, "iabn"),
    }
    for budget in [None] + budgets:
        label = "compile" if budget is None else f"compile budget={budget:g}"
        for kind, base in (("bn", bn), ("iabn", iabn)):
            model = copy.deepcopy(base)
            out[f"{kind} {label}"] = (_compiled(model, budget), model, kind)
    return out, references


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _kept(run: Callable, module: nn.Module, batch: int, size: int, classes: int) -> tuple[int, int]:
    """(resident bytes a forward adds and keeps until backward, exact saved-for-backward bytes)."""
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, classes, (batch,) if classes == 1000 else (batch, size, size))
    gc.collect()
    before = _rss_bytes()
    saved, loss, _ = saved_tensor_bytes(lambda: F.cross_entropy(run(x), target), exclude=parameters_of(module) + [x])
    kept = _rss_bytes() - before
    loss.backward()
    module.zero_grad(set_to_none=True)
    del loss
    return kept, saved


def _step(run: Callable, module: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    module.zero_grad(set_to_none=True)
    start = time.perf_counter()
    F.cross_entropy(run(x), target).backward()
    return time.perf_counter() - start


def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in module.parameters() if p.grad is not None]


def bench_models(args: argparse.Namespace) -> None:
    pinned = os.environ.get("MALLOC_MMAP_THRESHOLD_") == "65536"
    if args.rss and not pinned:  # RSS only counts tensors with the pin
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    torch.set_num_threads(args.threads[0])
    # Every compiled variant recompiles for the second batch size; inductor's on-disk caches are off so that
    # no artifact compiled under one memory budget serves another.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    torch._inductor.config.fx_graph_cache = False
    meta = provenance()
    rows = []
    small, large = args.batches
    for model_name, factory in _torchvision_models().items():
        if args.models and model_name not in args.models:
            continue
        classes = 1000 if model_name == "resnet50" else 21
        variants, references = _variants(factory, args.budgets)
        if args.variants:
            variants = {k: v for k, v in variants.items() if any(k.startswith(p) for p in args.variants)}
        results: dict[str, dict[str, float]] = {}
        for name, (run, module, _) in _progress(list(variants.items()), f"{model_name}: memory"):
            module.train()
            _kept(run, module, small, args.size, classes)  # compiles (per batch size) outside the measurement
            _kept(run, module, large, args.size, classes)
            rss_small, saved_small = _kept(run, module, small, args.size, classes)
            rss_large, saved_large = _kept(run, module, large, args.size, classes)
            results[name] = {
                "rss_per_sample": (rss_large - rss_small) / (large - small) if args.rss else float("nan"),
                "saved_per_sample": (saved_large - saved_small) / (large - small),
            }
        torch.manual_seed(2)
        x = torch.randn(small, 3, args.size, args.size)
        target = torch.randint(0, classes, (small,) if classes == 1000 else (small, args.size, args.size))
        grads = {}
        for name, (run, module, _) in variants.items():
            _step(run, module, x, target)
            grads[name] = _grads(module)
        reference_grads = {}
        for kind, module in references.items():
            module.train()
            _step(lambda inp, m=module: _logits(m, inp), module, x.double(), target)
            reference_grads[kind] = _grads(module)
        grad_diff = {
            name: (
                sum(float((g.double() - r).square().sum()) for g, r in zip(grads[name], reference_grads[kind]))
                / sum(float(r.square().sum()) for r in reference_grads[kind])
            )
            ** 0.5
            for name, (_, _, kind) in variants.items()
        }
        floor = {kind: grad_diff.get(f"{kind} eager", float("nan")) for kind in references}
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for i in _progress(range(args.rounds), f"{model_name}: time"):
            for name in names if i % 2 == 0 else names[::-1]:
                run, module, _ = variants[name]
                times[name].append(_step(run, module, x, target))
        base_time = statistics.median(times["bn eager"]) if "bn eager" in times else None
        base_mem = results.get("bn eager", {}).get("saved_per_sample")
        for name, (_run, _module, kind) in variants.items():
            median = statistics.median(times[name])
            diff = grad_diff[name]
            ok = diff <= GRAD_FLOOR_FACTOR * floor[kind]
            row = {
                **meta, "model": model_name, "variant": name, "size": args.size, "batches": f"{small},{large}",
                "threads": args.threads[0], "rounds": args.rounds,
                "rss_mb_per_sample": f"{results[name]['rss_per_sample'] / 2**20:.2f}",
                "saved_mb_per_sample": f"{results[name]['saved_per_sample'] / 2**20:.2f}",
                "memory_ratio": f"{results[name]['saved_per_sample'] / base_mem:.3f}" if base_mem else "",
                "allocator_pinned": str(args.rss),
                "median_step_s": f"{median:.4f}", "time_ratio": f"{median / base_time:.3f}" if base_time else "",
                "grad_rel_diff_vs_float64": f"{diff:.2e}", "grad_floor": f"{floor[kind]:.2e}", "grad_ok": str(ok),
            }  # fmt: skip
            rows.append(row)
            print(f"{model_name:>20} {name:<28} rss {row['rss_mb_per_sample']:>8} MB/sample "
                  f"(saved {row['saved_mb_per_sample']:>8}) x{row['memory_ratio']:<6} step {median:7.3f} s "
                  f"x{row['time_ratio']:<6} grad diff {diff:.1e} (floor {floor[kind]:.1e})"
                  f"{'' if ok else '  <-- DIFFERS'}")  # fmt: skip
    out = args.out or RESULTS / "bench_residual_models.csv"
    append_csv(out, rows)
    _plot(rows, Path(out).with_suffix(".png"))


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in rows if r["model"] == model and r["memory_ratio"] and r["time_ratio"]):
            iabn = r["variant"].startswith("iabn")
            ax.scatter(float(r["memory_ratio"]), float(r["time_ratio"]), marker="o" if iabn else "s",
                       color="tab:red" if iabn else "tab:blue")  # fmt: skip
            ax.annotate(r["variant"], (float(r["memory_ratio"]), float(r["time_ratio"])), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")  # fmt: skip
        ax.set_xlabel("memory kept for backward per sample (x BatchNorm eager)")
        ax.set_ylabel("training step time (x BatchNorm eager)")
        ax.set_title(f"{model}, {rows[0]['size']}x{rows[0]['size']}, {rows[0]['threads']} threads (CPU)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    layer = sub.add_parser("layer", help="one fused layer against BatchNorm + add + ReLU")
    layer.add_argument("--shapes", nargs="+", type=_shape, default=["16x256x56x56", "8x32x28x28"])
    layer.add_argument("--threads", nargs="+", type=int_range(1), default=[1, 2])
    layer.add_argument("--rounds", type=int_range(1), default=None, help="interleaved rounds (default 30; --quick 5)")
    layer.add_argument("--quick", action="store_true")
    layer.add_argument("--out", type=Path, default=None)
    models = sub.add_parser("models", help="whole-model training steps (needs torchvision)")
    models.add_argument("--models", nargs="+", choices=["resnet50", "deeplabv3_resnet50"], default=None)
    models.add_argument("--variants", nargs="+", default=None, help="only variants whose name starts with one of these")
    models.add_argument("--size", type=int_range(1), default=None, help="image size (default 224; --quick 64)")
    models.add_argument("--batches", nargs=2, type=int_range(1), default=[2, 4], metavar=("SMALL", "LARGE"))
    models.add_argument("--budgets", nargs="+", type=float_range(0, 1, low_open=True), default=[0.5, 0.2])
    models.add_argument("--threads", nargs=1, type=int_range(1), default=[2])
    models.add_argument("--rounds", type=int_range(1), default=None, help="interleaved rounds (default 5; --quick 2)")
    models.add_argument("--quick", action="store_true")
    models.add_argument(
        "--rss", action="store_true",
        help="also measure resident memory (re-executes with MALLOC_MMAP_THRESHOLD_=65536; every large "
        "allocation then page-faults, which slows allocating variants: times are then not comparable)",
    )  # fmt: skip
    models.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.part == "layer":
        args.rounds = args.rounds or (5 if args.quick else 30)
        bench_layer(args)
    else:
        if args.batches[0] >= args.batches[1]:
            parser.error(f"--batches SMALL LARGE needs SMALL < LARGE, got {args.batches}")
        args.size = args.size or (64 if args.quick else 224)
        args.rounds = args.rounds or (2 if args.quick else 5)
        bench_models(args)


if __name__ == "__main__":
    main()
