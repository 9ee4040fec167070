"""The adapter file format: peft LoRA files plus the grader's metadata, and the one check of them.

An adapter directory holds what peft saves (``adapter_config.json``,
``adapter_model.safetensors``) and ``grader_adapter.json``: the exam part it
was made for, the label scale it was trained on, and how it was made.
Training writes this format; serving reads it.

:func:`check_adapter` is the only place an adapter is inspected (files, rank,
content hash). Its result is cached by the files' size and modification time,
so config loading, the part registry, ``PUT /v1/parts``, training and
evaluation all share one hash of each adapter version.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.grading.levels import Level

# LoRA goes on the language model's projections only: vLLM applies LoRA to its
# own linear layers, and the audio tower/projector are not among them. A key on
# the tower would be dropped silently at serving time, so training must not make one.
LANGUAGE_MODEL_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

METADATA_FILE = "grader_adapter.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
_HASH_BLOCK = 1 << 20


class AdapterError(ValueError):
    """An adapter directory is missing, incomplete or unusable."""


@dataclass(frozen=True)
class AdapterFiles:
    """A checked adapter directory: where it is, its LoRA rank and the content hash of its weights."""

    path: Path
    rank: int
    content_hash: str  # sha256 of the peft files, 16 hex digits: names the exact weights served


def check_adapter(path: str | Path, max_rank: int | None = None) -> AdapterFiles:
    """Check an adapter directory vLLM must load; :class:`AdapterError` says what is wrong.

    Cached per version of the files (their sizes and modification times).
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    missing = [f for f in PEFT_FILES if not (path / f).is_file()]
    if missing:
        raise AdapterError(f"adapter directory {path} lacks {', '.join(missing)}")
    stamp = tuple((name, st.st_size, st.st_mtime_ns) for name in PEFT_FILES for st in [(path / name).stat()])
    files = _inspect(path.resolve(), stamp)
    if max_rank is not None and files.rank > max_rank:
        raise AdapterError(f"adapter {path}: rank {files.rank} exceeds engine.max_lora_rank {max_rank}")
    return files


@functools.lru_cache(maxsize=256)
def _inspect(path: Path, stamp: tuple) -> AdapterFiles:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {path}: adapter_config.json is not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {path}: adapter_config.json must hold a JSON object")
    if cfg.get("use_dora"):
        raise AdapterError(f"adapter {path}: DoRA adapters are not supported by vLLM")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapter {path}: bias={cfg['bias']!r} is not supported by vLLM (use 'none')")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"adapter {path}: modules_to_save is not supported by vLLM")
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"adapter {path}: adapter_config.json needs a positive integer rank 'r', not {rank!r}")
    h = hashlib.sha256()
    for name in PEFT_FILES:
        h.update(name.encode())
        with open(path / name, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
    return AdapterFiles(path=path, rank=rank, content_hash=h.hexdigest()[:16])


def write_adapter_metadata(path: Path, *, part: str, levels: Sequence[Level], training: dict[str, Any]) -> None:
    """Write ``grader_adapter.json`` beside peft's files."""
    meta = {"part": part, "levels": [lv.model_dump() for lv in levels], "training": training}
    (path / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_adapter_metadata(path: Path) -> dict[str, Any] | None:
    """The adapter's ``grader_adapter.json``, or None for a plain peft adapter."""
    f = path / METADATA_FILE
    return json.loads(f.read_text()) if f.is_file() else None
