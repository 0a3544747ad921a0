"""The command-line entry point shared by the trainers: parse, run, and turn user errors into exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional, Sequence, Tuple, Type

__all__ = ["run_cli"]


def run_cli(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Any],
    argv: Optional[Sequence[str]],
    user_errors: Tuple[Type[BaseException], ...],
    is_user_error: Optional[Callable[[BaseException], bool]] = None,
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
