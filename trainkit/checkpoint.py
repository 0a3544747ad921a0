"""Checkpoints written atomically and loaded with errors that say what is wrong and what to do."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .outdir import TEMP_PREFIX

__all__ = [
    "CheckpointError",
    "ResumeError",
    "CHECKSUM_KEY",
    "content_sha256",
    "atomic_save",
    "load_checkpoint",
    "check_same_args",
]

#: Top-level key of the content checksum that :func:`atomic_save` adds to a dict checkpoint.
CHECKSUM_KEY = "content_sha256"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, not of the expected kind, or was written by an incompatible run."""


class ResumeError(CheckpointError):
    """A --resume checkpoint is missing, corrupt or was written by an incompatible run."""


def _feed(h: hashlib._Hash, obj: Any) -> None:
    """Hashes ``obj`` into ``h``: type tags, lengths and keys in order, tensors by dtype, shape and bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (set, frozenset)):  # iteration order varies between processes: hash sorted digests
        h.update(f"S{len(obj)}".encode())
        for digest in sorted(_digest(v) for v in obj):
            h.update(digest)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:  # numbers, strings, None, dtypes: repr round-trips them (floats exactly, NaN included)
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def _digest(obj: Any) -> bytes:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.digest()


def content_sha256(obj: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's content (every entry but :data:`CHECKSUM_KEY`), as it is after loading.

    Computed over the loaded objects rather than the file's bytes, so the checksum lives inside the file
    (still a plain ``torch.load``-able dict) and a flipped byte anywhere in a tensor, a number or a key
    changes it.

    Args:
        obj: A checkpoint dict.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to a temp file in the target's folder, fsync, then ``os.replace`` onto ``path``.

    A crash (or Ctrl-C) at any moment leaves either the previous file or the new one, never half a file;
    the temp file is removed on failure. The result gets the usual permissions (0666 minus the umask).
    A dict gets its :func:`content_sha256` under :data:`CHECKSUM_KEY`, which :func:`load_checkpoint`
    verifies.

    Args:
        obj: Anything ``torch.save`` accepts.
        path: Destination; its folder must exist.
    """
    if isinstance(obj, dict):
        obj = {**obj, CHECKSUM_KEY: content_sha256(obj)}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600: give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(
    path: str,
    required: Iterable[str] = (),
    kind: str = "training",
    option: str = "--resume",
    error: type[Exception] = CheckpointError,
    checkpoint_name: str = "checkpoint.pt",
) -> dict[str, Any]:
    """Loads a checkpoint on the CPU with ``weights_only=True``, verifies its checksum and its ``required`` keys.

    A checkpoint written by :func:`atomic_save` carries a :func:`content_sha256` that must match its content
    (a damaged file is refused); one without the key (written before checksums existed) loads unverified.

    Args:
        path: The file.
        required: Top-level keys the checkpoint must have.
        kind: What wrote it, for messages (e.g. ``"densenet.train"``).
        option: The command-line option that named the file, for messages.
        error: Exception class raised (a subclass of :class:`CheckpointError` is typical).
        checkpoint_name: The usual file name, for messages.

    Returns:
        The checkpoint dict.

    Raises:
        error: file not found ("not found"), unreadable ("corrupt"), content that does not match its checksum
            ("damaged"), or keys missing ("not a ... checkpoint").
    """
    if not os.path.isfile(path):
        raise error(
            f"{option} checkpoint not found: {path!r} (expected the {checkpoint_name} of an earlier run's --out)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise error(
            f"{option} checkpoint {path!r} is corrupt or not a checkpoint ({type(e).__name__}: {e}). "
            f"Checkpoints are written atomically, so use an intact {checkpoint_name} or start afresh without {option}."
        ) from e
    if isinstance(ckpt, dict) and CHECKSUM_KEY in ckpt and ckpt[CHECKSUM_KEY] != content_sha256(ckpt):
        raise error(
            f"{option} checkpoint {path!r} is damaged: its content does not match the SHA-256 stored when it was "
            f"written. Use an intact copy of {checkpoint_name} or start afresh without {option}."
        )
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise error(f"{option} checkpoint {path!r} is not a {kind} checkpoint (missing {missing}).")
    return ckpt


def check_same_args(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    keys: Iterable[str],
    path: str,
    error: type[Exception] = CheckpointError,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Refuses to resume when options that shape the run differ from those stored in the checkpoint.

    Args:
        saved: The arguments stored in the checkpoint (``vars(args)`` of the run that wrote it).
        current: The arguments of this run.
        keys: Option names (argparse ``dest``) that must be equal.
        path: The checkpoint file, for the message.
        error: Exception class raised.
        defaults: Values of options added after a checkpoint was written: a checkpoint that lacks such an
            option ran with this value.

    Raises:
        error: naming every differing option as ``--name saved (now current)``.
    """
    keys, defaults = list(keys), defaults or {}
    saved = {k: saved.get(k, defaults.get(k)) for k in keys}
    diff = [k for k in keys if saved[k] != current.get(k)]
    if diff:
        detail = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (now {current.get(k)!r})" for k in diff)
        raise error(
            f"--resume checkpoint {path!r} was written with different settings: {detail}. "
            "Pass the same options to continue exactly."
        )
