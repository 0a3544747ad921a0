"""The command-line entry point shared by the trainers: parse, run, and turn user errors into exit code 2."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["run_cli", "int_range", "float_range", "int_list"]


def _bounds_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "finite"


def _check_bounds(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


def int_range(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for an integer in [``low``, ``high``] (None: unbounded on that side).

    argparse turns its error into ``argument --name: must be an integer >= 1, got '-3'`` and exit status 2,
    before the command does any work.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not _check_bounds(value, low, high, False, False):
            raise argparse.ArgumentTypeError(
                f"must be an integer {_bounds_text(low, high, False, False)}, got {text!r}"
            )
        return value

    parse.__name__ = "integer"
    return parse


def float_range(
    low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse ``type`` for a finite number between ``low`` and ``high`` (open ends with ``*_open``).

    NaN and infinities are always refused.
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and _check_bounds(value, low, high, low_open, high_open)):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {_bounds_text(low, high, low_open, high_open)}, got {text!r}"
            )
        return value

    parse.__name__ = "number"
    return parse


def int_list(low: int | None = None, high: int | None = None) -> Callable[[str], list[int]]:
    """An argparse ``type`` for comma-separated integers, each in [``low``, ``high``] (e.g. ``--threads 1,2``)."""
    one = int_range(low, high)

    def parse(text: str) -> list[int]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}")
        return [one(t) for t in items]

    parse.__name__ = "integer list"
    return parse


def run_cli(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Any],
    argv: Sequence[str] | None,
    user_errors: tuple[type[BaseException], ...],
    is_user_error: Callable[[BaseException], bool] | None = None,
) -> int:
    """Runs ``run(parser.parse_args(argv))``; returns 0, or 2 after a one-line ``error: ...`` on stderr.

    Errors are classified by type only, never by their message text.

    Args:
        parser: The command's options. A value argparse rejects (e.g. outside ``choices``) prints argparse's
            usage and error and returns its exit status (2); ``--help`` returns 0.
        run: The command.
        argv: Arguments (None: ``sys.argv[1:]``).
        user_errors: Exception types that mean bad data, options or checkpoints (no traceback for those).
        is_user_error: Also treats other exceptions it accepts as user errors (a predicate on the
            exception's type or attributes); everything else propagates.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits after printing its message: hand the status back
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        run(args)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a user error
        if not (isinstance(e, user_errors) or (is_user_error is not None and is_user_error(e))):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
