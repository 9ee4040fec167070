"""The program's own lines on stderr, the same for every command: ``l2grader: ...``."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROG = "l2grader"


def log(message: str) -> None:
    """One line of the program's own (progress, warnings, what to do next) on stderr."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit."""
    log(f"error: {message}")
    raise SystemExit(code)


@contextmanager
def library_output_to(path: Path) -> Iterator[None]:
    """Within: this process's file descriptor 2 appended to ``path`` (what C++ libraries and child processes, such
    as vLLM's engine, write there) and Python's warnings with it, while ``sys.stderr``, the program's own lines,
    still reaches the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    program, sys.stderr = sys.stderr, open(terminal, "w", buffering=1, errors="backslashreplace", closefd=False)
    show = warnings.showwarning

    def to_log(message, category, filename, lineno, file=None, line=None):  # Python warnings of libraries too
        os.write(2, warnings.formatwarning(message, category, filename, lineno, line).encode(errors="replace"))

    warnings.showwarning = to_log
    try:
        yield
    finally:
        warnings.showwarning = show
        sys.stderr.flush()
        os.dup2(terminal, 2)
        os.close(terminal)
        sys.stderr = program
