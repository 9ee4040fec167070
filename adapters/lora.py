"""What makes a directory a part's adapter: peft LoRA files plus the grader's metadata.

An adapter directory holds what peft saves (``adapter_config.json``,
``adapter_model.safetensors``) and ``grader_adapter.json``: the exam part it
was made for, the label scale it was trained on, and how it was made.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serve.levels import Level

# LoRA goes on the language model's projections only: vLLM applies LoRA to its
# own linear layers, and the audio tower/projector are not among them. A key on
# the tower would be dropped silently at serving time, so training must not make one.
LANGUAGE_MODEL_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

METADATA_FILE = "grader_adapter.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterError(ValueError):
    """An adapter directory is missing, incomplete or unusable."""


def check_adapter_dir(path: Path) -> None:
    """Raise :class:`AdapterError` unless ``path`` holds a peft LoRA adapter vLLM can load."""
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    missing = [f for f in PEFT_FILES if not (path / f).is_file()]
    if missing:
        raise AdapterError(f"adapter directory {path} lacks {', '.join(missing)}")
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise AdapterError(f"adapter {path}: DoRA adapters are not supported by vLLM")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapter {path}: bias={cfg['bias']!r} is not supported by vLLM (use 'none')")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"adapter {path}: modules_to_save is not supported by vLLM")


def adapter_rank(path: Path) -> int:
    """The LoRA rank ``r`` an adapter was saved with."""
    return int(json.loads((path / "adapter_config.json").read_text())["r"])


def adapter_hash(path: Path) -> str:
    """Content hash (sha256, 16 hex digits) of an adapter's peft files: names the exact weights served."""
    h = hashlib.sha256()
    for name in PEFT_FILES:
        h.update(name.encode())
        h.update((path / name).read_bytes())
    return h.hexdigest()[:16]


def write_adapter_metadata(path: Path, *, part: str, levels: Sequence[Level], training: dict[str, Any]) -> None:
    """Write ``grader_adapter.json`` beside peft's files."""
    meta = {"part": part, "levels": [lv.model_dump() for lv in levels], "training": training}
    (path / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_adapter_metadata(path: Path) -> dict[str, Any] | None:
    """The adapter's ``grader_adapter.json``, or None for a plain peft adapter."""
    f = path / METADATA_FILE
    return json.loads(f.read_text()) if f.is_file() else None
