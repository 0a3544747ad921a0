"""The run directory (``--out``): never replace an earlier run by accident, and fail before training if unusable."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Sequence

__all__ = ["OutDirError", "next_free_out_dir", "prepare_out_dir", "remove_stale_temp_files", "TEMP_PREFIX"]

#: Prefix of the temp files that :func:`trainkit.atomic_save` and :func:`trainkit.write_csv` write next to
#: their destination before renaming them (left behind only when a process is killed mid-write).
TEMP_PREFIX = ".tmp-"


class OutDirError(ValueError):
    """``--out`` holds an earlier run (without ``--resume`` / ``--overwrite``), is a file, or is not writable."""


def remove_stale_temp_files(folder: str) -> list[str]:
    """Removes the ``.tmp-*`` files an interrupted atomic write left in ``folder``; returns their paths.

    Args:
        folder: A run directory (missing: nothing to do).
    """
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), TEMP_PREFIX + "*"))):
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            removed.append(path)
    return removed


def next_free_out_dir(base: str, products: Sequence[str]) -> str:
    """``base`` if it holds none of ``products`` (no earlier run), else the first of ``base-2``, ``base-3``, ...
    that holds none: a default run folder that never replaces, nor refuses to run next to, an earlier run.
    """
    candidate, n = base, 1
    while any(os.path.exists(os.path.join(candidate, p)) for p in products):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def prepare_out_dir(
    out: str,
    products: Sequence[str],
    resume: str | None = None,
    overwrite: bool = False,
    create: bool = True,
) -> None:
    """Checks ``--out`` before any training: usable, and not holding an earlier run unless that is intended.

    An earlier run is any of ``products`` (e.g. ``checkpoint.pt``, ``log.csv``, ``final.json``) present in
    ``out``. It is refused unless this run resumes (``resume``) or ``overwrite`` is set; with ``overwrite``
    those files are removed now, so nothing of the earlier run survives to be mistaken for this one's.
    Stale ``.tmp-*`` files of interrupted writes are removed in every case.

    Args:
        out: The ``--out`` folder (created when missing, with ``create``).
        products: File names a run writes into ``out``.
        resume: The ``--resume`` checkpoint, or None.
        overwrite: ``--overwrite`` was given.
        create: Create the folder and check that a file can be written in it (False: only the read-only
            checks, for processes other than the one that writes).

    Raises:
        OutDirError: ``out`` is a file, cannot be created or written, or holds an earlier run (the message
            names the files and the two options that allow it).
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutDirError(f"--out {out!r} is a file, not a folder; pass a folder path")
    earlier = [p for p in products if os.path.exists(os.path.join(out, p))]
    if earlier and resume is None and not overwrite:
        raise OutDirError(
            f"--out {out!r} already holds a run ({', '.join(earlier)}); continue it with --resume "
            f"{os.path.join(out, 'checkpoint.pt')}, replace it with --overwrite, or choose another --out"
        )
    if not create:
        return
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutDirError(
            f"--out {out!r} cannot be written ({type(e).__name__}: {e.strerror or e}); pass a writable folder"
        ) from e
    remove_stale_temp_files(out)
    if overwrite and resume is None:
        for p in earlier:
            path = os.path.join(out, p)
            if os.path.isfile(path):
                os.remove(path)
