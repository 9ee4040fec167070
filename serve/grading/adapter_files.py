"""The adapter file format: peft LoRA files plus the grader's metadata, and the one check of them.

An adapter directory holds what peft saves (``adapter_config.json``,
``adapter_model.safetensors``) and ``grader_adapter.json``: the exam part it
was made for, the label scale it was trained on, and how it was made,
including the ids of its training answers and speakers
(:func:`training_record`), which ``calibrate`` and ``evaluate`` keep out of
their held-out sets. Training writes the metadata; serving reads only peft's
files (and the calibration beside them), never the metadata.

:func:`check_adapter` is the only place an adapter is inspected (files, rank,
content hash). An adapter is identified by the hash of its content; the check
is cached by each file's inode, size, modification and change times (a write
in place changes the change time even when size and modification time are
put back), so config loading, the part registry, ``PUT /v1/parts``, training
and evaluation share one hash of each adapter version. A scorer replica hashes
the files again when it loads them (:func:`verify_content`) and refuses
content that is not the version it was asked for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
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
#: Largest adapter_config.json / safetensors header read (real ones are a few KB).
MAX_METADATA_BYTES = 1 << 20


class AdapterError(ValueError):
    """An adapter directory is missing, incomplete or unusable."""


class AdapterChangedError(AdapterError):
    """An adapter's files no longer hold the content it was registered with."""


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
    stamp = tuple(
        (name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        for name in PEFT_FILES
        for st in [(path / name).stat()]
    )
    files = _inspect(path.resolve(), stamp)
    if max_rank is not None and files.rank > max_rank:
        raise AdapterError(f"adapter {path}: rank {files.rank} exceeds engine.max_lora_rank {max_rank}")
    return files


@functools.lru_cache(maxsize=256)
def _inspect(path: Path, stamp: tuple) -> AdapterFiles:
    cfg = _read_json(path / "adapter_config.json", path)
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {path}: adapter_config.json must hold a JSON object")
    if cfg.get("use_dora"):
        raise AdapterError(f"adapter {path}: DoRA adapters are not supported by vLLM")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapter {path}: bias={cfg['bias']!r} is not supported by vLLM (use 'none')")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"adapter {path}: modules_to_save is not supported by vLLM")
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 4096:
        raise AdapterError(
            f"adapter {path}: adapter_config.json needs a positive integer rank 'r', not {str(rank)[:20]!r}"
        )
    for name, shape in weight_shapes(path / PEFT_FILES[1]).items():
        which = "lora_A" if ".lora_A." in name else "lora_B" if ".lora_B." in name else None
        if which is None:
            raise AdapterError(f"adapter {path}: tensor {name[:200]!r} is not a LoRA A or B matrix")
        if len(shape) != 2 or shape[0 if which == "lora_A" else 1] != rank:
            raise AdapterError(f"adapter {path}: {name[:200]} has shape {shape[:4]}, which does not match rank {rank}")
    return AdapterFiles(path=path, rank=rank, content_hash=content_hash(path))


def content_hash(path: Path) -> str:
    """sha256 of the adapter's peft files (names and bytes), 16 hex digits; no cache."""
    h = hashlib.sha256()
    for name in PEFT_FILES:
        h.update(name.encode())
        with open(path / name, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
    return h.hexdigest()[:16]


def verify_content(part: str, files: AdapterFiles) -> None:
    """:class:`AdapterChangedError` unless the files at ``files.path`` still hold ``files.content_hash``.

    The message names the part and both hashes, not the path (scoring clients may see it).
    """
    try:
        found = content_hash(files.path)
    except OSError:
        found = "unreadable"
    if found != files.content_hash:
        raise AdapterChangedError(
            f"the adapter files of part {part!r} changed after they were registered (registered content "
            f"{files.content_hash}, found {found}): an admin must register the part again (PUT /v1/parts/{part})"
        )


def _read_json(file: Path, path: Path) -> dict[str, Any]:
    """A small JSON object file of the adapter; :class:`AdapterError` for anything else."""
    try:
        if file.stat().st_size > MAX_METADATA_BYTES:
            raise AdapterError(f"adapter {path}: {file.name} is larger than {MAX_METADATA_BYTES} bytes")
        data = json.loads(file.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise AdapterError(f"adapter {path}: {file.name} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"adapter {path}: {file.name} must hold a JSON object")
    return data


def weight_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header (the weights are not read)."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_METADATA_BYTES:
                raise AdapterError(f"{file.name}: header of {n} bytes is not a LoRA adapter's")
            header = json.loads(f.read(n))
        shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, RecursionError, struct.error, TypeError, KeyError, AttributeError):
        raise AdapterError(f"{file.name} is not a readable safetensors file") from None
    if not shapes or not all(isinstance(s, list) and all(isinstance(d, int) for d in s) for s in shapes.values()):
        raise AdapterError(f"{file.name} holds no tensors with valid shapes")
    return shapes


#: LoRA target module -> which model dimensions are its (in, out) features.
MODULE_FEATURES = {
    "q_proj": ("hidden", "q"),
    "k_proj": ("hidden", "kv"),
    "v_proj": ("hidden", "kv"),
    "o_proj": ("q", "hidden"),
    "gate_proj": ("hidden", "ffn"),
    "up_proj": ("hidden", "ffn"),
    "down_proj": ("ffn", "hidden"),
}


def check_lora_dims(files: AdapterFiles, dims: dict[str, int]) -> None:
    """:class:`AdapterError` unless every LoRA matrix fits the base model's module (``dims``: hidden, q, kv, ffn)."""
    for name, shape in weight_shapes(files.path / PEFT_FILES[1]).items():
        m = re.search(r"\.(\w+_proj)\.lora_([AB])\.", name)
        if m is None or m.group(1) not in MODULE_FEATURES:
            raise AdapterError(
                f"adapter {files.path}: {name[:200]} targets no language-model projection the engine has"
            )
        fin, fout = (dims[d] for d in MODULE_FEATURES[m.group(1)])
        want = [files.rank, fin] if m.group(2) == "A" else [fout, files.rank]
        if shape != want:
            raise AdapterError(f"adapter {files.path}: {name[:200]} has shape {shape}, the base model needs {want}")


def training_record(path: str | Path) -> tuple[set[str], set[str]]:
    """The audio ids and speakers an adapter was trained on, from its ``grader_adapter.json`` (empty sets when it
    records none: adapters made before it did, or by other tools)."""
    try:
        meta = json.loads((Path(path) / METADATA_FILE).read_text())
        training = meta.get("training") or {}
        return set(map(str, training.get("answer_ids") or ())), set(map(str, training.get("speakers") or ()))
    except (OSError, ValueError, AttributeError):
        return set(), set()


def write_adapter_metadata(
    path: Path, *, part: str, levels: Sequence[Level], training: dict[str, Any], aspect: str | None = None
) -> None:
    """Write ``grader_adapter.json`` beside peft's files (``aspect``: the one aspect an adapter of its own scores)."""
    meta: dict[str, Any] = {"part": part}
    if aspect:
        meta["aspect"] = aspect
    meta.update(levels=[lv.model_dump() for lv in levels], training=training)
    (path / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
