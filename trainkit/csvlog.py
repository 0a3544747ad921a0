"""The per-epoch CSV log of a training run (rewritten whole each epoch, so a resumed run continues it)."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from .outdir import TEMP_PREFIX

__all__ = ["write_csv", "read_csv"]


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    """Writes ``rows`` under a header of ``fields``, atomically (temp file + ``os.replace``).

    Args:
        path: Destination; its folder must exist.
        rows: One mapping per row; keys outside ``fields`` are an error (``csv.DictWriter``'s rule).
        fields: Column names, in order.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".csv", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(fields))
            w.writeheader()
            w.writerows(rows)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_csv(path: str, upto_epoch: int | None = None) -> list[dict[str, str]]:
    """Reads a log written by :func:`write_csv`; [] when the file does not exist.

    Args:
        path: The CSV file.
        upto_epoch: Keep only rows whose integer ``epoch`` column is <= this (rows of epochs a resumed
            run will redo are dropped); None keeps every row.

    Returns:
        The rows as dicts of strings.
    """
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if upto_epoch is None:
        return rows
    return [r for r in rows if (r.get("epoch") or "").isdigit() and int(r["epoch"]) <= upto_epoch]
