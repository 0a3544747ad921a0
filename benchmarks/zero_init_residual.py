"""How often the fused residual layer keeps x_hat in a zero-initialised ResNet-50, and what it costs.

The last BatchNorm of every bottleneck starts at weight 0 (torchvision's ``zero_init_residual=True``,
timm's default ``zero_init_last``), so gamma = eps and the fused layer's inversion would be lossy
(docs/math.md, "Residual fusion"): the layer keeps x_hat of the lossy channels for those calls. This
script trains ``segmentation.build_model("resnet50", norm="iabn")`` with zero-initialised bn3 weights on
the generated street scenes (``segmentation.synthetic``) and reports, at chosen steps, how many of the 16
fused layers keep some x_hat, how many channels (of 15360) and the exact bytes a training forward saves
for backward, against the same model with the rule switched off (what it would save if every inversion
were accurate).

    python benchmarks/zero_init_residual.py                       # float32, 300 steps
    python benchmarks/zero_init_residual.py --dtype bfloat16      # CPU autocast to bfloat16
    python benchmarks/zero_init_residual.py --steps 20 --report-at 0 10 20   # a quick look

Rows are appended to ``benchmarks/results/zero_init_residual.csv`` (with machine, torch, revision, date).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _provenance import append_csv, float_range, int_range, provenance  # noqa: E402  (benchmarks/, the script's folder)

import inplace_abn.functions as functions  # noqa: E402
from inplace_abn.memory import parameters_of, saved_tensor_bytes  # noqa: E402
from segmentation import build_model  # noqa: E402
from segmentation.data import CityscapesSegmentation  # noqa: E402
from segmentation.models import Bottleneck  # noqa: E402
from segmentation.synthetic import generate  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - optional
    tqdm = None

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


class _KeepCounter:
    """Counts the fused-layer calls and channels judged lossy (by wrapping the rule's one home);
    ``disabled`` turns the rule off, to count what the layers would save without it."""

    def __init__(self) -> None:
        self.layers = self.channels = self.calls = 0
        self.disabled = False
        self._rule = functions.residual_lossy_channels

    def __call__(self, *args, **kwargs):
        if self.disabled:
            return None
        lossy = self._rule(*args, **kwargs)
        self.calls += 1
        if lossy is not None:
            self.layers += 1
            self.channels += lossy.numel()
        return lossy

    @contextlib.contextmanager
    def installed(self):
        functions.residual_lossy_channels = self
        try:
            yield self
        finally:
            functions.residual_lossy_channels = self._rule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="activation dtype (CPU autocast)")
    parser.add_argument("--steps", type=int_range(1), default=300)
    parser.add_argument("--report-at", nargs="+", type=int_range(0), default=[0, 1, 5, 10, 25, 50, 100, 200, 300])
    parser.add_argument("--batch", type=int_range(1), default=4)
    parser.add_argument("--lr", type=float_range(0, 10, low_open=True, high_open=True), default=0.01)
    parser.add_argument("--threads", type=int_range(1), default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "zero_init_residual.csv")
    args = parser.parse_args(argv)
    late = [s for s in args.report_at if s > args.steps]
    if late:
        parser.error(f"--report-at {late} lies beyond --steps {args.steps}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as data:
        generate(data, num_train=32, num_val=1, size=(64, 128), seed=0)
        dataset = CityscapesSegmentation(data, "train")
        samples = [dataset[i] for i in range(len(dataset))]  # tiny: keep it in memory
    model = build_model("resnet50", 19, norm="iabn", output_stride=16).train()
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    for block in blocks:
        nn.init.zeros_(block.bn3.weight)
    total_channels = sum(block.bn3.num_features for block in blocks)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    autocast = (
        torch.autocast("cpu", dtype=DTYPES[args.dtype]) if DTYPES[args.dtype] is not None else contextlib.nullcontext()
    )
    counter = _KeepCounter()
    meta = provenance()
    rows: list[dict[str, object]] = []
    steps = range(args.steps + 1)
    with counter.installed():
        for step in tqdm(steps, desc=f"zero-init resnet50 ({args.dtype})") if tqdm else steps:
            idx = [(step * args.batch + k) % len(samples) for k in range(args.batch)]
            images = torch.stack([samples[i][0] for i in idx])
            labels = torch.stack([samples[i][1] for i in idx])
            if step in args.report_at:  # the saving without the rule: a forward whose graph is dropped
                counter.disabled = True
                with autocast:
                    without, _, _ = saved_tensor_bytes(lambda: model(images), exclude=parameters_of(model) + [images])
                counter.disabled = False
            counter.layers = counter.channels = counter.calls = 0
            with autocast:
                saved, logits, _ = saved_tensor_bytes(lambda: model(images), exclude=parameters_of(model) + [images])
                loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
            layers, channels, calls = counter.layers, counter.channels, counter.calls
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step in args.report_at:
                row = {
                    **meta, "dtype": args.dtype, "step": step, "batch": args.batch, "fused_layers": calls,
                    "layers_keeping_xhat": layers, "channels_keeping_xhat": channels, "channels": total_channels,
                    "saved_mb": f"{saved / 2**20:.3f}", "saved_mb_without_rule": f"{without / 2**20:.3f}",
                    "loss": f"{loss.item():.4f}",
                }  # fmt: skip
                rows.append(row)
                print(f"step {step:4d}: {layers:2d} of {calls} fused layers keep x_hat of {channels} of {total_channels} "
                      f"channels; saved {row['saved_mb']} MB (without the rule {row['saved_mb_without_rule']} MB), "
                      f"loss {row['loss']}")  # fmt: skip
    append_csv(args.out, rows)


if __name__ == "__main__":
    main()
