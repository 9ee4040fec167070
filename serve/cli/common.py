"""What every ``l2grader`` subcommand shares: the program name, one-line errors, config loading."""

from __future__ import annotations

from serve.runtime.console import PROG, fail, log  # noqa: F401 - the commands' shared helpers


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
