"""What a part's scores depend on, as short identities: the key a calibration is valid for.

A calibration measures the errors of one exact scoring set-up. Anything that
changes the label distribution of an answer changes those errors, so
:func:`score_fingerprint` names each such thing as a component, and
:func:`serve.grading.calibration.load` calls a calibration stale when any
component differs, naming which:

- ``adapter``: the content hash of the adapter's weights;
- ``base_model``: the base checkpoint's name and the hash of its config and
  weight layout (:func:`base_hash`; a hub id alone where there is no local
  folder);
- ``prompt``: the rendered holistic prompt (task, levels, descriptors);
- ``scale``: each level's label, CEFR level and score;
- ``audio``: the audio preparation that changes what the model hears
  (chunk length, speech detector and its threshold, pause cutting and its
  settings);
- ``engine``: the engine settings that change logprobs (dtype).

Limits, timeouts and other settings that decide *whether* an answer is
scored, not *how*, are not part of it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from pathlib import Path

from serve.grading.config import AudioConfig, EngineConfig, PartConfig
from serve.grading.prompt import build_prompt

#: The audio settings that change the chunks the model hears (``min_speech_s`` and ``cut_off_db`` decide whether an
#: answer is scored or goes to review, not what the model hears: they are not here).
AUDIO_FIELDS = (
    "max_chunk_s",
    "speech_detector",
    "vad_threshold",
    "silence_dbfs",
    "cut_at_pauses",
    "pause_search_s",
    "min_pause_s",
    "max_extra_chunks",
)
#: The engine settings that change the label log-probabilities.
ENGINE_FIELDS = ("dtype",)


def base_name(base: str) -> str:
    """The base model's public name: a hub id's or a checkpoint folder's last part (``Qwen2-Audio-7B-Instruct``).

    Answers, metrics and logs name the model by this, never by where it lies.
    """
    return Path(base).name or str(base)


#: Largest safetensors header hashed (a 7B checkpoint's are a few hundred KB).
_MAX_HEADER = 64 << 20


@functools.lru_cache(maxsize=8)
def base_hash(base: str) -> str | None:
    """sha256 (16 hex digits) of a local checkpoint's config and weight layout; None for a hub id.

    It covers ``config.json`` and, per weight file, its name, size and
    safetensors header (every tensor's name, dtype, shape and offsets): a
    different checkpoint gets a different hash at the cost of reading a few
    hundred KB, not the 15 GB of weights of a 7B model (an adapter's hash
    covers its weights: :func:`serve.grading.adapter_files.check_adapter`).
    """
    root = Path(base)
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(root.iterdir()):
        if f.name == "config.json" or f.name.endswith(".index.json"):
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
            if f.suffix == ".safetensors":
                with open(f, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    h.update(fh.read(min(n, _MAX_HEADER)))
    return h.hexdigest()[:16]


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def score_fingerprint(
    pcfg: PartConfig, adapter_hash: str | None, *, base: str, audio: AudioConfig, engine: EngineConfig
) -> dict[str, str]:
    """The components a part's scores depend on (see the module's docstring)."""
    return {
        "adapter": adapter_hash or "none",
        "base_model": f"{base_name(base)}@{base_hash(base) or 'hub'}",
        "prompt": _digest(build_prompt(pcfg.task, pcfg.levels)),
        "scale": _digest([[lv.label, lv.cefr, lv.score] for lv in pcfg.levels]),
        "audio": _digest({k: getattr(audio, k) for k in AUDIO_FIELDS}),
        "engine": _digest({k: getattr(engine, k) for k in ENGINE_FIELDS}),
    }


def aspect_fingerprint(
    part_fingerprint: dict[str, str], aspect_prompt: str, aspect_levels, adapter_hash: str | None
) -> dict[str, str]:
    """An aspect's components: its part's, with the aspect's own prompt, scale and adapter in place of the part's."""
    return {
        **part_fingerprint,
        "adapter": adapter_hash or "none",
        "prompt": _digest(aspect_prompt),
        "scale": _digest([[lv.label, lv.cefr, lv.score] for lv in aspect_levels]),
    }
