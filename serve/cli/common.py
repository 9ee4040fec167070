"""What every ``l2grader`` subcommand shares: the program name, one-line errors, config loading."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from serve.runtime.console import PROG, fail, library_output_to, log


def engine_output(command: str, verbose: bool) -> contextlib.AbstractContextManager:
    """Within: unless ``verbose``, vLLM's log and what the engine's libraries print go to a file under the temporary
    folder, named on stderr, while the program's own lines still reach the terminal. Enter it before vLLM is
    imported (its logging is configured at import)."""
    if verbose:
        return contextlib.nullcontext()
    from serve.engine.requests import vllm_logs_to_file  # does not import vLLM

    path = Path(tempfile.gettempdir()) / PROG / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    vllm_logs_to_file(path)
    log(f"engine log: {path} (--verbose prints it here)")
    return library_output_to(path)


def load_config_or_exit(path: str, part: str | None = None):
    """The validated config, its ``serving:`` section included (and, if given, a check that ``part`` is
    registered); one error line and exit 2 otherwise."""
    from serve.grading.config import ConfigError, UnknownPartError  # pydantic: only when a command runs
    from serve.service.settings import load_service_config

    try:
        cfg = load_service_config(path)
        if part is not None:
            parts_or_exit(cfg, path, [part])
    except (ConfigError, UnknownPartError) as e:
        fail(str(e))
    return cfg


def parts_or_exit(cfg, config_path: str, names=None) -> dict:
    """The registered parts (the config's plus those added with ``PUT /v1/parts``, as the service sees them), all
    or the given ``names``, adapters checked; one error line and exit 2 for an unknown part or a bad adapter."""
    from serve.grading.adapter_files import AdapterError  # as above: only when a command runs
    from serve.grading.config import UnknownPartError
    from serve.service.settings import part_registry

    try:
        registry = part_registry(cfg, config_path)
        return registry.entries() if names is None else {n: registry.get(n) for n in names}
    except (UnknownPartError, AdapterError, ValueError) as e:
        fail(str(e))
