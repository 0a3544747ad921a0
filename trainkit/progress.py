"""A progress bar: tqdm on a terminal when it is installed, otherwise a small built-in one (no dependency).

On a terminal the bar is tqdm's, or without tqdm a built-in one that redraws one carriage-return line.
When the stream is not a terminal (CI logs, files, pipes) a plain line is printed every ``interval``
seconds instead, so a long epoch is never silent and logs carry no carriage-return redraws.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``75.3`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``; ``"?"`` for NaN/inf."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts steps towards ``total`` and shows them.

    Use as a context manager or call :meth:`close`. With ``enabled=False`` every method does nothing.

    Args:
        total: Number of steps expected (the bar shows a fraction of it; more steps are allowed).
        desc: Label at the start of the line.
        enabled: False: show nothing.
        stream: Where to write (default ``sys.stderr``, looked up at construction).
        backend: ``"auto"`` (tqdm on a terminal if importable, else built-in), ``"tqdm"`` (always tqdm) or
            ``"builtin"``.
        interval: Built-in bar, non-terminal stream: seconds between printed lines.
        refresh: Built-in bar, terminal: minimum seconds between redraws.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        enabled: bool = True,
        stream: TextIO | None = None,
        backend: str = "auto",
        interval: float = 30.0,
        refresh: float = 0.1,
    ) -> None:
        if backend not in ("auto", "tqdm", "builtin"):
            raise ValueError(f"backend must be 'auto', 'tqdm' or 'builtin', got {backend!r}")
        self.total, self.desc, self.enabled = int(total), desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval, self.refresh = interval, refresh
        self.n = 0
        self.postfix = ""
        self._tqdm: Any = None
        self._start = self._last = time.monotonic()
        self._width = 0
        self._closed = False
        if not enabled:
            return
        isatty = getattr(self.stream, "isatty", None)
        self._tty = bool(isatty and isatty())
        # auto: tqdm draws on terminals; logs and pipes get the built-in periodic plain lines instead of
        # tqdm's carriage-return redraws.
        if backend == "tqdm" or (backend == "auto" and self._tty):
            try:
                from tqdm import tqdm
            except ImportError:
                if backend == "tqdm":
                    raise ImportError("Progress(backend='tqdm') needs tqdm: pip install tqdm") from None
            else:
                self._tqdm = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=self.stream)

    # ------------------------------------------------------------------ public API (tqdm-like)
    def update(self, n: int = 1) -> None:
        """Advances by ``n`` steps."""
        if not self.enabled or self._closed:
            return
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        now = time.monotonic()
        if self._tty and (now - self._last >= self.refresh or self.n >= self.total):
            self._draw(now)
        elif not self._tty and now - self._last >= self.interval:
            self.stream.write(self._line(now) + "\n")
            self.stream.flush()
            self._last = now

    def set_postfix(self, **values: Any) -> None:
        """Shows ``key=value`` pairs after the counter (e.g. the running loss)."""
        if not self.enabled or self._closed:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix(**values)
            return
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Removes the terminal line (like tqdm's ``leave=False``); idempotent."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ built-in rendering
    def _line(self, now: float, bar_width: int = 0) -> str:
        elapsed = now - self._start
        rate = self.n / elapsed if elapsed > 0 else float("nan")
        eta = (self.total - self.n) / rate if rate and rate > 0 and self.n < self.total else 0.0
        frac = min(self.n / self.total, 1.0) if self.total > 0 else 1.0
        bar = ""
        if bar_width:
            filled = int(round(frac * bar_width))
            bar = " [" + "#" * filled + "." * (bar_width - filled) + "]"
        head = f"{self.desc}: " if self.desc else ""
        speed = f"{rate:.2f} it/s" if rate >= 1 or not math.isfinite(rate) else f"{1 / rate:.2f} s/it"
        tail = f" {self.postfix}" if self.postfix else ""
        return (
            f"{head}{100 * frac:3.0f}%{bar} {self.n}/{self.total} "
            f"[{format_seconds(elapsed)}<{format_seconds(eta)}, {speed}]{tail}"
        )

    def _draw(self, now: float) -> None:
        line = self._line(now, bar_width=20)
        pad = max(self._width - len(line), 0)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)
        self._last = now


def progress(total: int, desc: str = "", enabled: bool = True, **kwargs: Any) -> Progress:
    """Shortcut for :class:`Progress` (``progress(n, "epoch 1/5", enabled=not args.no_progress)``)."""
    return Progress(total, desc=desc, enabled=enabled, **kwargs)
