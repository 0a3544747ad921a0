"""benchmarks/ab_pure_path.py: exports package copies of revisions and times them against the baseline."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "ab_pure_path.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _is_git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    probe = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _is_git_checkout(), reason="needs a git checkout (it exports revisions)")
def test_ab_times_each_revision_against_the_baseline():
    result = _run("HEAD", "worktree", "--shape", "2x4x5x5", "--rounds", "20", "--no-stable-heap")
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^\s+(\S+)\s+median\s+([\d.]+) ms\s+x([\d.]+)$", result.stdout, re.MULTILINE)
    medians = {name: float(ms) for name, ms, _ in rows}
    ratios = {name: float(r) for name, _, r in rows}
    assert list(ratios) == ["BatchNorm2d+LeakyReLU(inplace)", "HEAD", "worktree"], result.stdout
    assert "shape 2x4x5x5" in result.stdout and "rounds 20" in result.stdout, result.stdout
    base = medians["BatchNorm2d+LeakyReLU(inplace)"]
    assert all(ms > 0 for ms in medians.values()), result.stdout
    # each printed ratio is its median over the baseline's (up to the rounding of the 3-decimal figures)
    for name, ratio in ratios.items():
        expected = medians[name] / base
        slack = 5e-4 + expected * 5e-4 * (1 / medians[name] + 1 / base)
        assert abs(ratio - expected) <= slack, f"{name}: x{ratio} printed, {medians[name]} / {base} = {expected:.4f}"


@pytest.mark.parametrize(
    "args,message",
    [
        (("worktree", "--shape", "8x32"), "--shape needs >= 3 positive sizes"),
        (("worktree", "worktree"), "revisions must be distinct"),
        pytest.param(
            ("no-such-revision-xyz", "--no-stable-heap", "--rounds", "1"),
            "git archive 'no-such-revision-xyz' failed",
            marks=pytest.mark.skipif(not _is_git_checkout(), reason="needs a git checkout"),
        ),
    ],
)
def test_ab_rejects_bad_arguments(args, message):
    result = _run(*args)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
