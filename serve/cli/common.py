"""What every ``l2grader`` subcommand shares: the program name, one-line errors, config loading."""

from __future__ import annotations

import sys

PROG = "l2grader"


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def load_config_or_exit(path: str, part: str | None = None):
    """The validated config (and, if given, a check that ``part`` is in it); one error line and exit 2 otherwise."""
    from serve.grading.config import ConfigError, UnknownPartError, load_config  # pydantic: only when a command runs

    try:
        cfg = load_config(path)
        if part is not None:
            cfg.part(part)
    except (ConfigError, UnknownPartError) as e:
        fail(str(e))
    return cfg
