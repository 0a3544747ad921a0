"""``python -m inplace_abn.selftest`` on the CPU: every case passes and the CLI reports what it checked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import inplace_abn
from inplace_abn.selftest import main, run_checks

pytestmark = pytest.mark.skipif(not inplace_abn.extension_loaded(), reason="compiled extension not built")


@pytest.fixture(scope="module")
def cpu_rows():
    return run_checks("cpu", quick=True)


def test_run_checks_cpu_all_pass(cpu_rows):
    failed = [r for r in cpu_rows if not r["passed"]]
    assert not failed, "\n".join(
        f"{r['shape']} {r['dtype']} {r['activation']}: err {r['max_rel_err']:.3g} on {r['worst']} "
        f"(tol {r['tol']}) {r['error'] or ''}"
        for r in failed
    )


def test_run_checks_cpu_covers_the_grid(cpu_rows):
    assert len({r["shape"] for r in cpu_rows}) >= 4
    assert {r["dtype"] for r in cpu_rows} == {"float64", "float32", "float16", "bfloat16"}
    assert {r["activation"] for r in cpu_rows} == {"leaky_relu", "elu", "identity"}
    assert any(r["channels_last"] for r in cpu_rows)
    assert {len(r["dims"]) for r in cpu_rows} >= {2, 3, 4}
    assert all(r["device"] == "cpu" and r["error"] is None for r in cpu_rows)
    for r in cpu_rows:
        assert r["fused_ms"] > 0 and r["pure_ms"] > 0 and r["speedup"] > 0
        assert 0 <= r["max_rel_err"] < float("inf")
    # the quick CPU grid leaves out the two largest shapes
    assert "16x64x56x56" not in {r["shape"] for r in cpu_rows}


def test_cli_quick_cpu():
    env = dict(os.environ, INPLACE_ABN_BACKEND="")
    proc = subprocess.run(
        [sys.executable, "-m", "inplace_abn.selftest", "--quick", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "selftest: OK" in out, out
    assert "PASS" in out and "FAIL" not in out, out
    if not torch.cuda.is_available():
        assert "No CUDA GPU is visible" in out and "CPU kernels" in out, out
    else:
        assert "--device cpu" in out, out


def test_main_rejects_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["--quick", "--device", "cuda"]) == 1
    captured = capsys.readouterr()
    assert "no CUDA GPU is visible" in captured.err
