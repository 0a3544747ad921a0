"""convert_model on real third-party networks: layer counts, saved-for-backward bytes, one training step.

Needs torchvision (and optionally timm) usable with the installed torch; no weights are downloaded
(random init; BN statistics and weights are randomised so the eval comparison is not trivial).

    python benchmarks/convert_models.py [--size 224] [--batch 2] [--csv benchmarks/results/convert_models.csv]

Per model: BatchNorm layers before; In-Place ABN layers after, by activation; BNs kept and why; bytes autograd
keeps for one training forward (``inplace_abn.memory_report``, parameters excluded) before / after; one SGD step
(loss finite, no autograd error); and the max |eval output difference| of an ``activation="relu"``
conversion (exact semantics, so ~rounding) and of the default ``leaky_relu(0.01)`` one (the function changes).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _provenance import int_range  # noqa: E402  (benchmarks/, the script's folder)

from inplace_abn import ABN, get_backend  # noqa: E402
from inplace_abn.convert import convert_model  # noqa: E402
from inplace_abn.memory_report import memory_report  # noqa: E402


def _models():
    out = []
    try:
        from torchvision.models import resnet50
        from torchvision.models.segmentation import deeplabv3_resnet50

        out.append(("torchvision resnet50", lambda: resnet50(weights=None)))
        out.append(
            (
                "torchvision deeplabv3_resnet50",
                lambda: deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=False),
            )
        )
    except Exception as exc:  # noqa: BLE001
        print(f"# torchvision unusable: {type(exc).__name__}: {exc}")
    try:
        import timm

        out.append(("timm resnet50", lambda: timm.create_model("resnet50", pretrained=False)))
        out.append(("timm resnet18", lambda: timm.create_model("resnet18", pretrained=False)))
    except Exception as exc:  # noqa: BLE001
        print(f"# timm unusable: {type(exc).__name__}: {exc}")
    return out


def _main_output(out):
    return out["out"] if isinstance(out, dict) else out


def _randomize(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, ABN)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _train_step(model, x):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = _main_output(model(x.clone())).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int_range(32), default=224)
    parser.add_argument("--batch", type=int_range(2), default=2)
    parser.add_argument(
        "--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "convert_models.csv")
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    header = (
        "model",
        "BN before",
        "IABN after (by activation)",
        "BN kept",
        "saved MB before",
        "after",
        "ratio",
        "train loss",
        "max|d| relu",
        "max|d| leaky",
    )
    print(f"# torch {torch.__version__}, backend {get_backend()}, input {tuple(x.shape)}")
    print(" | ".join(header))
    for name, make in _models():
        model = _randomize(make())
        n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            conv, report = convert_model(model, return_report=True)
            exact = convert_model(model, activation="relu")
        # eval comparisons first: a training forward would move the original's running statistics
        with torch.no_grad():
            ref = _main_output(model.eval()(x.clone()))
            d_relu = float((_main_output(exact.eval()(x.clone())) - ref).abs().max())
            d_leaky = float((_main_output(conv.eval()(x.clone())) - ref).abs().max())
        # the package's count (meta device; equal to a CPU forward's, tests/test_memory_report*.py)
        counted = memory_report(model, tuple(x.shape), top=0)
        before, after = counted.variant("as given").saved_bytes, counted.variant("In-Place ABN").saved_bytes
        loss = _train_step(conv, x)
        assert loss == loss and abs(loss) != float("inf"), f"{name}: loss {loss}"
        kept = "; ".join(f"{n}x {r}" for r, n in report.kept_reasons().items()) or "0"
        row = (
            name,
            n_bn,
            f"{len(report.converted)} {report.counts()}",
            f"{len(report.kept)}",
            f"{before / 2**20:.1f}",
            f"{after / 2**20:.1f}",
            f"{after / before:.3f}",
            f"{loss:.4g}",
            f"{d_relu:.2e}",
            f"{d_leaky:.2e}",
        )
        print(" | ".join(str(v) for v in row))
        if report.kept:
            print(f"#   kept: {kept}")
        rows.append(dict(zip(header, row), kept_reasons=kept, before_bytes=before, after_bytes=after))
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        fields = [
            "date",
            "torch",
            "backend",
            "machine",
            "batch",
            "size",
            *header,
            "kept_reasons",
            "before_bytes",
            "after_bytes",
        ]
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "torch": torch.__version__,
                    "backend": get_backend(),
                    "machine": platform.machine(),
                    "batch": args.batch,
                    "size": args.size,
                    **r,
                }
            )
    print(f"# appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
