"""The README main job: generate the synthetic data set (if absent) and train a small model on it on CPU.

    python -m segmentation.demo                        # data/synthetic + runs/segmentation-demo, a few minutes
    python -m segmentation.demo --norm bn              # any segmentation.train option overrides the defaults

It runs ``segmentation.train`` with settings sized for a laptop CPU (a narrow WiderResNet-38 A2 +
DeepLabV3, 128-pixel crops) and prints the validation mIoU, the per-class IoU table and the activation
memory saved by In-Place ABN versus standard BatchNorm. Everything else (CSV log, checkpoint,
prediction PNGs) is in ``--out``; ``python -m segmentation.evaluate --checkpoint
runs/segmentation-demo/checkpoint.pt`` re-evaluates it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from trainkit import next_free_out_dir

from . import synthetic
from . import train as seg_train

__all__ = ["main", "DEMO_ARGS"]

#: segmentation.train options of the demo (any of them can be overridden on the command line).
DEMO_ARGS: list[str] = [
    "--arch",
    "wrn38",
    "--norm",
    "iabn",
    "--width",
    "0.125",
    "--output-stride",
    "8",
    "--crop",
    "128",
    "--scale-min",
    "0.75",
    "--scale-max",
    "1.5",
    "--batch-size",
    "8",
    "--iters",
    "800",
    "--lr",
    "0.1",
    "--eval-every",
    "20",
    "--save-predictions",
    "6",
    "--device",
    "cpu",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Generates the data if needed, then runs ``segmentation.train``; returns its exit status."""
    p = argparse.ArgumentParser(
        prog="python -m segmentation.demo",
        description="Generate the synthetic Cityscapes-layout data set (if absent) and train a small model on CPU. "
        "Other options are passed to segmentation.train and override the demo's: " + " ".join(DEMO_ARGS),
    )
    p.add_argument(
        "--data",
        default=os.path.join("data", "synthetic"),
        help="data folder; generated with segmentation.synthetic when it holds no data set",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run folder (default: runs/segmentation-demo, or runs/segmentation-demo-2, -3, ... when it holds an "
        "earlier run: a repeated demo neither replaces nor refuses; an explicit --out that holds a run needs "
        "--resume or --overwrite)",
    )
    ours, rest = p.parse_known_args(argv)
    if ours.out is None:
        ours.out = next_free_out_dir(os.path.join("runs", "segmentation-demo"), seg_train.RUN_FILES)

    if not os.path.isdir(os.path.join(ours.data, "leftImg8bit")):
        print(f"generating the synthetic data set in {ours.data} ...", flush=True)
        t0 = time.perf_counter()
        try:
            synthetic.generate(ours.data, seed=0)
        except (FileExistsError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"  done in {time.perf_counter() - t0:.1f}s", flush=True)
    else:
        print(f"using the data set in {ours.data}", flush=True)

    defaults = list(DEMO_ARGS)
    if "--epochs" in rest:  # --epochs and --iters are exclusive: the user's choice wins
        i = defaults.index("--iters")
        del defaults[i : i + 2]
    t0 = time.perf_counter()
    rc = seg_train.main(["--data", ours.data, "--out", ours.out, *defaults, *rest])
    if rc == 0:
        print(
            f"demo finished in {time.perf_counter() - t0:.0f}s; log, checkpoint and prediction PNGs in {ours.out}",
            flush=True,
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
