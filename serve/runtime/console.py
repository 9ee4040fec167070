"""The program's own lines on stderr, the same for every command: ``l2grader: ...``."""

from __future__ import annotations

import sys

PROG = "l2grader"


def log(message: str) -> None:
    """One line of the program's own (progress, warnings, what to do next) on stderr."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit."""
    log(f"error: {message}")
    raise SystemExit(code)
