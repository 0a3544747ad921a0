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

    Args:
        parser: The command's options.
        run: The command.
        argv: Arguments (None: ``sys.argv[1:]``).
        user_errors: Exception types that mean bad data, options or checkpoints (no traceback for those).
        is_user_error: Also treats other exceptions it accepts as user errors; everything else propagates.
    """
    args = parser.parse_args(argv)
    try:
        run(args)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a user error
        if not (isinstance(e, user_errors) or (is_user_error is not None and is_user_error(e))):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
