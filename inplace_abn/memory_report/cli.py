"""``python -m inplace_abn.memory_report MODEL --input NxCxHxW``: the report of :func:`memory_report` for a
model named on the command line, printed, and optionally written as JSON and plotted.

MODEL forms: ``torchvision:NAME`` (classification and segmentation builders), ``timm:NAME`` (when timm is
installed), ``segmentation:ARCH`` and ``densenet:NAME`` (this repository's models, with BatchNorm, as a user
would start), or ``package.module:callable`` (any factory returning an ``nn.Module``, called without
arguments). Every model is built under ``torch.device("meta")``: no weights are allocated or downloaded.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import json
import re
import sys
import textwrap
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .report import DTYPES, OPTIMIZERS, PEAK_FORMULA, MemoryReport, memory_report

__all__ = ["main", "build_parser", "resolve_model", "parse_shape", "parse_bytes", "save_plot"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_DENSENETS = ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264")
_FORMS = (
    "torchvision:NAME, timm:NAME, segmentation:ARCH, densenet:NAME or package.module:callable "
    "(e.g. torchvision:resnet50)"
)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` -> (1, 3, 224, 224): at least N and C, every size a positive int.

    Raises:
        ValueError: naming the text and the expected form.
    """
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) < 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"expected NxCxHxW with positive integers (at least NxC), e.g. 1x3x224x224; got {text!r}")
    return tuple(int(p) for p in parts)


def parse_bytes(text: str) -> int:
    """``"16GiB"`` -> 17179869184. Units B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (1024); none = bytes.

    Raises:
        ValueError: naming the text and the expected form.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) * _UNITS[match.group(2)] < 1:
        raise ValueError(f"expected a positive size such as 16GiB, 512MiB or 8GB; got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _close(name: str, names: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, list(names), n=3)
    return f"; did you mean {', '.join(near)}?" if near else ""


def _torchvision(name: str) -> Callable[[], nn.Module]:
    try:
        import torchvision.models as tvm
    except Exception as exc:  # an ImportError, or a torchvision built for another torch
        raise ValueError(
            f"torchvision is not usable here ({type(exc).__name__}: {exc}); install the torchvision matching your torch"
        ) from None
    names = tvm.list_models()
    if name not in names:
        raise ValueError(f"unknown torchvision model {name!r}{_close(name, names)} (torchvision.models.list_models())")
    builder = tvm.get_model_builder(name)
    kwargs = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # segmentation/detection builders: no backbone download either
    return lambda: builder(**kwargs)


def _timm(name: str) -> Callable[[], nn.Module]:
    try:
        import timm
    except Exception as exc:
        raise ValueError(f"timm is not usable here ({type(exc).__name__}: {exc}); pip install timm") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}{_close(name, timm.list_models())} (timm.list_models())")
    return lambda: timm.create_model(name, pretrained=False)


def _repository(kind: str, name: str) -> Callable[[], nn.Module]:
    # Imported here, at run time, on purpose: the inplace_abn package must not depend on the example
    # packages (segmentation, densenet sit above it in the layering); they import inplace_abn, not the reverse.
    try:
        module = importlib.import_module(kind)
    except ImportError as exc:
        raise ValueError(
            f"{kind}:{name} needs this repository's {kind!r} package on the path (run from the repository root): {exc}"
        ) from None
    if kind == "segmentation":
        if name not in module.ARCHS:
            raise ValueError(f"unknown segmentation arch {name!r}; one of {', '.join(module.ARCHS)}")
        return lambda: module.build_model(name, num_classes=19, norm="bn")
    if name not in _DENSENETS:
        raise ValueError(f"unknown densenet {name!r}{_close(name, _DENSENETS)}; one of {', '.join(_DENSENETS)}")
    return lambda: getattr(module, name)(norm="bn", memory="naive")


def _user_factory(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in module_name.split(".") + attr.split(".")):
        raise ValueError(f"malformed {spec!r}; expected {_FORMS}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for {spec!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, not a callable returning an nn.Module")
    return obj


def resolve_model(spec: str) -> Callable[[], nn.Module]:
    """The factory (no arguments) that MODEL ``spec`` names; see the module docstring for the forms.

    Raises:
        ValueError: a malformed or unknown name, or a missing package (the message says which and the fix).
    """
    kind, sep, name = spec.partition(":")
    if not sep or not kind or not name:
        raise ValueError(f"malformed {spec!r}; expected {_FORMS}")
    if kind == "torchvision":
        return _torchvision(name)
    if kind == "timm":
        return _timm(name)
    if kind in ("segmentation", "densenet"):
        return _repository(kind, name)
    return _user_factory(spec)


def save_plot(report: MemoryReport, path: str, max_batch: int | None = None) -> None:
    """Writes a PNG of the estimated peak against the batch size, one line per variant, and the budget.

    Args:
        report: The report.
        path: Output file (the format follows the suffix; .png in the CLI).
        max_batch: Right end of the batch axis (default: 1.5 x the largest fitting batch, at least 8).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = [v.max_batch or 0 for v in report.variants]
    end = max_batch or max(8, int(1.5 * max(fits + [report.input_shape[0]])) + 1)
    batches = list(range(1, end + 1))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v in report.variants:
        (line,) = ax.plot(batches, [v.peak_bytes(b) / 2**30 for b in batches], label=v.name)
        if v.max_batch:
            ax.plot([v.max_batch], [v.peak_bytes(v.max_batch) / 2**30], "o", color=line.get_color())
    if report.budget_bytes is not None:
        ax.axhline(
            report.budget_bytes / 2**30,
            color="k",
            linestyle="--",
            label=f"budget {report.budget_bytes / 2**30:.3g} GiB",
        )
    ax.set_xlabel("batch size")
    ax.set_ylabel("estimated peak of a training step (GiB)")
    shape = "x".join(str(s) for s in report.input_shape[1:])
    ax.set_title(f"{report.model}, {shape} {report.dtype}, {report.optimizer}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command."""
    parser = argparse.ArgumentParser(
        prog="python -m inplace_abn.memory_report",
        description=textwrap.fill(
            "What In-Place ABN (convert_model) would save on a model, and the largest batch that fits a memory "
            "budget, counted exactly on the meta device (no memory, no weights downloaded). Compares the model as "
            "given, convert_model's In-Place ABN version and, for reference, torch.utils.checkpoint per top-level "
            "stage.",
            100,
        )
        + "\n\n"
        + textwrap.fill("peak estimate: " + PEAK_FORMULA, 100),
        epilog="examples: python -m inplace_abn.memory_report torchvision:resnet50 --input 32x3x224x224 --budget 16GiB\n"
        "          python -m inplace_abn.memory_report segmentation:wrn38 --input 1x3x1024x2048 --plot wrn38.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help=f"the model: {_FORMS}")
    parser.add_argument(
        "--input",
        required=True,
        metavar="NxCxHxW",
        help="shape of one training batch, e.g. 1x3x224x224 (N is the batch the totals are for)",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter and input dtype")
    parser.add_argument(
        "--budget",
        default="16GiB",
        metavar="SIZE",
        help="memory for one training step, for the largest batch that fits (default 16GiB; units B, KB..TB, KiB..TiB)",
    )
    parser.add_argument(
        "--optimizer",
        default="sgd",
        choices=sorted(OPTIMIZERS),
        help="optimizer state in the peak estimate: sgd (with momentum, 1 buffer per parameter) or adamw (2)",
    )
    parser.add_argument("--top", type=int, default=5, metavar="K", help="modules listed per variant (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="also plot estimated peak vs batch size per variant")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (argument errors exit with status 2 via ``parser.error``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        shape = parse_shape(args.input)
    except ValueError as exc:
        parser.error(f"argument --input: {exc}")
    try:
        budget = parse_bytes(args.budget)
    except ValueError as exc:
        parser.error(f"argument --budget: {exc}")
    if args.top < 0:
        parser.error(f"argument --top: must be >= 0, got {args.top}")
    if args.plot and not args.plot.lower().endswith(".png"):
        parser.error(f"argument --plot: expected a .png file name, got {args.plot!r}")
    try:
        factory = resolve_model(args.model)
    except ValueError as exc:
        parser.error(f"argument MODEL: {exc}")
    print(f"building {args.model} on the meta device ...", file=sys.stderr)
    with torch.device("meta"):
        model = factory()
    if not isinstance(model, nn.Module):
        parser.error(f"argument MODEL: {args.model!r} returned a {type(model).__name__}, not an nn.Module")
    print("counting saved tensors of 3 variants (as given, In-Place ABN, checkpoint) ...", file=sys.stderr)
    try:
        report = memory_report(
            model,
            shape,
            dtype=DTYPES[args.dtype],
            optimizer=args.optimizer,
            budget=budget,
            top=args.top,
            name=args.model,
        )
    except (RuntimeError, ValueError) as exc:  # typically a shape the model rejects: say which argument
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        parser.error(f"argument --input: {args.model} failed on a {args.input} {args.dtype} input: {first}")
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        save_plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
