"""memory_report on torchvision models: meta counts vs real CPU counts, the peak estimate vs measured peaks.

Needs a torchvision that works with the installed torch (CI: the CUDA build job, .ci/build_cuda.sh);
skipped otherwise. The CPU peak is the resident-set high-water mark of a subprocess run with glibc's mmap
threshold pinned (docs: ../shared/spec/measuring.md), so every large tensor is its own mapping, returned on
free, and RSS counts exactly the live tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

tvm = pytest.importorskip("torchvision.models")

from inplace_abn.memory_report import memory_report  # noqa: E402
from inplace_abn.memory_report.cli import main, resolve_model  # noqa: E402

VARIANTS = ("as given", "In-Place ABN", "checkpoint")


@pytest.mark.parametrize(
    "name,shape", [("resnet18", (2, 3, 64, 64)), ("resnet50", (2, 3, 64, 64)), ("deeplabv3_resnet50", (2, 3, 64, 64))]
)
def test_meta_counts_equal_real_counts(name, shape):
    model = resolve_model(f"torchvision:{name}")()
    meta = memory_report(model, shape)
    real = memory_report(model, shape, device="cpu")
    for v in VARIANTS:
        assert meta.variant(v).saved_bytes == real.variant(v).saved_bytes > 0, v
        assert meta.variant(v).saved_per_sample == real.variant(v).saved_per_sample, v
    abn = meta.variant("In-Place ABN")
    assert abn.saved_bytes < 0.7 * meta.variant("as given").saved_bytes and abn.fused > 0


def test_cli_torchvision_forms(capsys):
    assert main(["torchvision:resnet18", "--input", "1x3x224x224", "--top", "1"]) == 0
    assert "20 BatchNorms converted (8 fused" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["torchvision:resnet5", "--input", "1x3x224x224"])
    assert "unknown torchvision model 'resnet5'; did you mean" in capsys.readouterr().err


def test_cli_timm(capsys):
    pytest.importorskip("timm")
    assert main(["timm:resnet18", "--input", "1x3x224x224", "--top", "1"]) == 0
    assert "BatchNorms converted" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["timm:no_such_net_xyz", "--input", "1x3x224x224"])
    assert "unknown timm model 'no_such_net_xyz'" in capsys.readouterr().err


# One training step loop, the estimate for the same setting printed last. Steps 0-1 create the optimizer
# state and warm the allocator; the peak of steps 2-3 is read from VmHWM after clear_refs resets it.
_PEAK_SCRIPT = textwrap.dedent("""
    import gc, json, os, sys, torch
    from torchvision.models import resnet50
    from inplace_abn.memory_report import memory_report
    torch.set_num_threads(2)
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    def hwm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):  # loads the libraries' lazy state (thread pools, kernels) before the baseline
        torch.nn.functional.cross_entropy(tiny(torch.randn(2, 3, 16, 16)), torch.zeros(2, dtype=torch.long)).backward()
        opt.step(); opt.zero_grad()
    del tiny, opt; gc.collect()
    base = rss()
    model = resnet50(); opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, target = torch.randn(4, 3, 224, 224), torch.zeros(4, dtype=torch.long)
    peaks = []
    for step in range(4):
        opt.zero_grad(); gc.collect()
        open("/proc/self/clear_refs", "w").write("5")
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
        peaks.append(hwm() - base)
    estimate = memory_report(model, (4, 3, 224, 224)).variant("as given").peak_bytes(4)
    print(json.dumps({"measured": max(peaks[2:]), "estimate": estimate}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (VmHWM, clear_refs)")
def test_peak_estimate_against_resident_peak_cpu():
    """resnet50, batch 4, 224x224, SGD with momentum: estimate within 15% of the measured resident peak."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT], env=env, capture_output=True, text=True, check=True, timeout=900
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["measured"] > 300 * 2**20  # the step really ran (activations + state of resnet50)
    assert result["estimate"] == pytest.approx(result["measured"], rel=0.15), result


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_estimate_against_max_memory_allocated_gpu():
    """The same on a GPU: torch.cuda.max_memory_allocated over a steady training step, within 15%."""
    model = tvm.resnet50().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, target = torch.randn(4, 3, 224, 224, device="cuda"), torch.zeros(4, dtype=torch.long, device="cuda")
    peaks = []
    for _ in range(4):
        opt.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    estimate = memory_report(model, (4, 3, 224, 224)).variant("as given").peak_bytes(4)
    assert estimate == pytest.approx(max(peaks[2:]), rel=0.15)
