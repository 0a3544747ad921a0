"""What every benchmark row records (machine, torch version, git revision, date) and how rows are appended.

Shared by the benchmark scripts of this folder (run as ``python benchmarks/<script>.py``, which puts this
folder on ``sys.path``). Also hands them trainkit's argparse range types (``int_range``, ``float_range``,
``int_list``): every numeric option is checked before any work.
"""

from __future__ import annotations

import csv
import datetime as _dt
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["machine_name", "git_rev", "provenance", "append_csv", "int_range", "float_range", "int_list"]

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # appended: an installed inplace_abn is not shadowed by the source tree
    sys.path.append(str(ROOT))

from trainkit.cli import float_range, int_list, int_range  # noqa: E402


def machine_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_rev() -> str:
    """Short HEAD hash, with "-dirty" when tracked files differ from HEAD (read-only git calls)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT, capture_output=True)
    return rev + ("-dirty" if dirty.returncode != 0 else "")


def provenance() -> dict[str, str]:
    """run_id (UTC time + revision), machine, torch_version, git_rev and ISO date of this run."""
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    rev = git_rev()
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ") + "-" + rev,
        "machine": machine_name(),
        "torch_version": torch.__version__,
        "git_rev": rev,
        "date": now.isoformat(),
    }


def append_csv(path: Path, rows: list[dict[str, object]], columns: Sequence[str] | None = None) -> None:
    """Appends ``rows`` to ``path``, writing the header when the file is new.

    Raises:
        SystemExit: the existing file has another header (rows would land under the wrong columns).
    """
    columns = list(columns or rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
        if header != columns:
            raise SystemExit(f"{path} has a different header ({header}); write to a new file (--out)")
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)
