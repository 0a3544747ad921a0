"""inplace_abn.memory_report: meta-device counts equal real-device counts, the peak model, the CLI.

The torchvision / timm models and the measured-peak checks are in test_memory_report_torchvision.py
(they need torchvision, which CI installs in the CUDA build job).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import inplace_abn
from densenet import densenet_bc
from inplace_abn.memory_report import MemoryReport, memory_report
from inplace_abn.memory_report.cli import main, parse_bytes, parse_shape
from segmentation import build_model

VARIANTS = ("as given", "In-Place ABN", "checkpoint")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_wrn38() -> nn.Module:
    """WRN-38 + DeepLabV3 with BatchNorm at a quarter of the width (the factory of the callable-form test)."""
    return build_model("wrn38", num_classes=5, norm="bn", width=0.25)


def small_densenet() -> nn.Module:
    return densenet_bc(40, growth_rate=12, norm="bn", memory="naive")


class Block(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add, ReLU (BN before the add is fused)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def tiny_model() -> nn.Module:
    """A stem and two residual blocks: the model of the CLI tests (milliseconds)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        Block(),
        Block(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


@pytest.mark.parametrize(
    "factory,shape", [(small_wrn38, (2, 3, 64, 64)), (small_densenet, (2, 3, 32, 32)), (tiny_model, (2, 3, 16, 16))]
)
def test_meta_counts_equal_real_counts(backend, factory, shape):
    """Every variant's saved bytes, per module too, on meta equal those of real CPU forwards."""
    model = factory()
    meta = memory_report(model, shape, top=1000)
    real = memory_report(model, shape, top=1000, device="cpu")
    for name in VARIANTS:
        m, r = meta.variant(name), real.variant(name)
        assert m.saved_bytes == r.saved_bytes > 0, name
        assert (m.saved_per_sample, m.saved_fixed) == (r.saved_per_sample, r.saved_fixed), name
        assert sorted((x.name, x.bytes) for x in m.top_modules) == sorted((x.name, x.bytes) for x in r.top_modules)
        assert sum(x.bytes for x in m.top_modules) == m.saved_bytes  # the attribution covers every byte
    assert meta.variant("In-Place ABN").saved_bytes < meta.variant("as given").saved_bytes
    assert next(p for p in model.parameters()).device.type == "cpu"  # the model itself is untouched


def test_densenet_saves_about_half():
    """DenseNet-BC with BatchNorm + ReLU: every pair converts, In-Place ABN keeps about half."""
    report = memory_report(small_densenet(), (4, 3, 32, 32))
    abn, given = report.variant("In-Place ABN"), report.variant("as given")
    assert not abn.unconverted and abn.converted == 39
    assert 0.4 < abn.saved_bytes / given.saved_bytes < 0.6


def test_unconverted_layers_and_reasons_come_from_convert_model():
    """WRN-38's pre-activation bn1 reads a tensor the shortcut also uses: kept, with convert_model's reason."""
    report = memory_report(small_wrn38(), (1, 3, 64, 64))
    with pytest.warns(RuntimeWarning, match="could not trace"):
        _, conversion = inplace_abn.convert_model(small_wrn38(), return_report=True)
    abn = report.variant("In-Place ABN")
    assert abn.unconverted == [(layer.name, layer.reason) for layer in conversion.kept]
    assert abn.unconverted and all(reason for _, reason in abn.unconverted)
    assert abn.converted == len(conversion.converted)


def test_residual_fusion_is_counted():
    """The BN before each add is fused with it: one activation per block less than an identity layer."""
    report = memory_report(tiny_model(), (2, 3, 16, 16))
    assert report.variant("In-Place ABN").fused == 2


def test_per_sample_is_the_slope_and_totals_are_linear():
    shape = (3, 3, 16, 16)
    small, big = memory_report(tiny_model(), shape), memory_report(tiny_model(), (6, 3, 16, 16))
    for name in VARIANTS:
        a, b = small.variant(name), big.variant(name)
        assert a.saved_fixed + a.saved_per_sample * 6 == pytest.approx(b.saved_bytes)
        # the input batch (kept by the first conv) is in the count
        assert a.saved_per_sample >= 3 * 16 * 16 * 4


def test_peak_formula_and_largest_batch():
    report = memory_report(tiny_model(), (2, 3, 16, 16), optimizer="adamw", budget=50 * 2**20)
    for v in report.variants:
        trainable = sum(p.numel() * 4 for p in tiny_model().parameters())
        assert (v.grad_bytes, v.optimizer_bytes) == (trainable, 2 * trainable)
        expected = (
            v.param_bytes
            + v.grad_bytes
            + v.optimizer_bytes
            + v.saved_fixed
            + 7 * v.saved_per_sample
            + v.recompute_fixed
            + 7 * v.recompute_per_sample
            + 2 * (v.activation_fixed + 7 * v.activation_per_sample)
        )
        assert v.peak_bytes(7) == pytest.approx(expected)
        assert v.max_batch >= 1
        assert v.peak_bytes(v.max_batch) <= 50 * 2**20 < v.peak_bytes(v.max_batch + 1)
    assert report.variant("checkpoint").recompute_per_sample > 0
    assert report.variant("In-Place ABN").max_batch > report.variant("as given").max_batch
    assert report.variant("as given").largest_batch(1) == 0


@pytest.mark.parametrize("dtype,size", [(torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)])
def test_dtype_scales_bytes(dtype, size):
    report = memory_report(tiny_model(), (2, 3, 16, 16), dtype=dtype)
    v32 = memory_report(tiny_model(), (2, 3, 16, 16)).variant("as given")
    v = report.variant("as given")
    assert v.grad_bytes * 4 == v32.grad_bytes * size  # (num_batches_tracked stays int64)
    assert v.saved_per_sample * 4 == pytest.approx(v32.saved_per_sample * size, rel=0.01)
    assert report.dtype == str(dtype).split(".")[1]


def test_big_input_is_counted_without_allocating_it():
    """A 4096x4096 crop of the full WRN-38 keeps ~58 GiB for backward: more than this machine has, so it can
    only have been counted on meta; it scales with the pixels (16x a 1024x1024 crop, up to the head's
    image-pooling branch)."""
    model = build_model("wrn38", num_classes=19, norm="bn")
    big = memory_report(model, (1, 3, 4096, 4096)).variant("as given").saved_bytes
    small = memory_report(model, (1, 3, 1024, 1024)).variant("as given").saved_bytes
    assert big > 32 * 2**30
    assert big / small == pytest.approx(16, rel=0.01)


@pytest.mark.parametrize(
    "kwargs,exc,fragment",
    [
        (dict(input_shape=(3, 16, 16, 0)), ValueError, "input_shape"),
        (dict(input_shape=(3,)), ValueError, "input_shape"),
        (dict(input_shape="1x3x8x8"), ValueError, "input_shape"),
        (dict(dtype=torch.float64), ValueError, "dtype"),
        (dict(optimizer="adam"), ValueError, "optimizer must be one of"),
        (dict(budget=0), ValueError, "budget"),
        (dict(budget=float("inf")), ValueError, "budget"),
        (dict(top=-1), ValueError, "top"),
        (dict(model="resnet50"), ValueError, "model must be an nn.Module"),
    ],
)
def test_api_bad_arguments(kwargs, exc, fragment):
    args = dict(model=tiny_model(), input_shape=(2, 3, 16, 16))
    args.update(kwargs)
    with pytest.raises(exc, match=fragment):
        memory_report(args.pop("model"), args.pop("input_shape"), **args)


def test_output_without_floating_tensor_is_an_error():
    class Argmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x).argmax(1)

    with pytest.raises(ValueError, match="no floating-point tensor"):
        memory_report(Argmax(), (2, 3, 8, 8))


# --------------------------------------------------------------------------------------------------- CLI
TINY = f"{__name__}:tiny_model"


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["resnet50", "--input", "1x3x8x8"], "argument MODEL: malformed 'resnet50'"),
        (["torchvision:", "--input", "1x3x8x8"], "argument MODEL: malformed"),
        (["segmentation:wrn39", "--input", "1x3x8x8"], "unknown segmentation arch 'wrn39'"),
        (["densenet:densenet12", "--input", "1x3x8x8"], "did you mean densenet121"),
        (["no_such_module_xyz:make", "--input", "1x3x8x8"], "cannot import 'no_such_module_xyz'"),
        ([f"{__name__}:no_such_factory", "--input", "1x3x8x8"], "has no attribute 'no_such_factory'"),
        ([f"{__name__}:TINY", "--input", "1x3x8x8"], "not a callable"),
        ([f"{__name__}:small_wrn38-x", "--input", "1x3x8x8"], "malformed"),
        ([TINY, "--input", "1x3x16"], "argument --input: " + TINY + " failed on a 1x3x16 float32 input"),
        ([TINY, "--input", "3x16x16x"], "argument --input"),
        ([TINY, "--input", "0x3x16x16"], "argument --input"),
        ([TINY, "--input", "ax3x16x16"], "argument --input"),
        ([TINY, "--input", "16"], "at least NxC"),
        ([TINY, "--input", "1x3x16x16", "--budget", "16 GiBs"], "argument --budget"),
        ([TINY, "--input", "1x3x16x16", "--budget", "-1GiB"], "argument --budget"),
        ([TINY, "--input", "1x3x16x16", "--budget", "0"], "argument --budget"),
        ([TINY, "--input", "1x3x16x16", "--dtype", "float64"], "argument --dtype: invalid choice"),
        ([TINY, "--input", "1x3x16x16", "--optimizer", "adam"], "argument --optimizer: invalid choice"),
        ([TINY, "--input", "1x3x16x16", "--top", "-2"], "argument --top"),
        ([TINY, "--input", "1x3x16x16", "--plot", "out.pdf"], "argument --plot: expected a .png"),
        ([TINY], "--input"),
    ],
)
def test_cli_errors(argv, fragment, capsys):
    """Each bad argument exits with status 2 and a message naming the option and the value."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def _usable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # noqa: BLE001 (a torchvision built for another torch raises other errors)
        return False


@pytest.mark.parametrize("kind,module", [("torchvision", "torchvision.models"), ("timm", "timm")])
def test_cli_missing_torchvision_or_timm_is_a_clear_error(kind, module, capsys):
    if _usable(module):
        pytest.skip(f"{module} is usable here (covered by test_memory_report_torchvision.py)")
    with pytest.raises(SystemExit):
        main([f"{kind}:resnet50", "--input", "1x3x8x8"])
    assert f"argument MODEL: {kind} is not usable here" in capsys.readouterr().err


def test_python_dash_m_runs_without_runpy_warning(tmp_path):
    """The command form: the package attribute is the function, the submodule still runs as __main__."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.dirname(__file__)]))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "inplace_abn.memory_report",
            TINY,
            "--input",
            "2x3x16x16",
            "--json",
            str(tmp_path / "r.json"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "largest batch in 16.00 GiB" in out.stdout and "found in sys.modules" not in out.stderr
    assert json.loads((tmp_path / "r.json").read_text())["model"] == TINY


@pytest.mark.parametrize(
    "text,expected",
    [
        ("16GiB", 16 * 2**30),
        ("512mib", 512 * 2**20),
        ("8GB", 8 * 10**9),
        ("1.5KiB", 1536),
        ("1000", 1000),
        ("2 TiB", 2 * 2**40),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_shape():
    assert parse_shape("1x3x1024x2048") == (1, 3, 1024, 2048)
    assert parse_shape("8X16") == (8, 16)


def test_cli_json_plot_and_callable_form(tmp_path, capsys):
    """``package.module:callable``: prints the table, writes JSON with the documented schema and a PNG."""
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    assert (
        main(
            [
                TINY,
                "--input",
                "2x3x16x16",
                "--budget",
                "64MiB",
                "--optimizer",
                "adamw",
                "--top",
                "3",
                "--json",
                str(out_json),
                "--plot",
                str(out_png),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "largest batch in 64.00 MiB" in captured.out and "peak estimate" in captured.out
    assert "building" in captured.err and "building" not in captured.out  # progress goes to stderr
    data = json.loads(out_json.read_text())
    assert data["model"] == TINY and data["input_shape"] == [2, 3, 16, 16] and data["optimizer"] == "adamw"
    assert data["budget_bytes"] == 64 * 2**20 and "peak(B)" in data["formula"]
    assert [v["name"] for v in data["variants"]] == list(VARIANTS)
    direct = memory_report(tiny_model(), (2, 3, 16, 16), optimizer="adamw", budget=64 * 2**20, top=3)
    for got, want in zip(data["variants"], direct.variants):
        assert set(got) >= {
            "saved_bytes",
            "saved_per_sample",
            "saved_fixed",
            "param_bytes",
            "grad_bytes",
            "optimizer_bytes",
            "peak_bytes",
            "max_batch",
            "top_modules",
            "unconverted",
            "saved_ratio",
        }
        assert got["saved_bytes"] == want.saved_bytes and got["max_batch"] == want.max_batch
        assert got["peak_bytes"] == pytest.approx(want.peak_bytes(2))
        assert len(got["top_modules"]) == 3 and set(got["top_modules"][0]) == {"name", "type", "bytes"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(out_png) > 5000


def test_cli_repository_models(capsys):
    """``segmentation:ARCH`` and ``densenet:NAME`` build the BatchNorm networks on meta (full size, seconds)."""
    assert main(["densenet:densenet121", "--input", "2x3x224x224", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "121 BatchNorms converted" in out and "0 kept" in out
    assert main(["segmentation:wrn38", "--input", "1x3x512x512", "--top", "1"]) == 0
    assert "BatchNorms converted" in capsys.readouterr().out


def test_report_object():
    report = memory_report(tiny_model(), (2, 3, 16, 16), budget=2**30)
    assert isinstance(report, MemoryReport) and inplace_abn.memory_report is memory_report
    with pytest.raises(KeyError, match="no variant"):
        report.variant("nope")
    text = str(report)
    assert text.count("\n") > 10 and "convert_model: 5 BatchNorms converted (2 fused" in text
