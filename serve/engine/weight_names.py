"""Qwen2-Audio parameter names: transformers 5's state dict against the published checkpoint.

transformers 5 names the modules ``model.language_model.*``,
``model.audio_tower.*``, ``model.multi_modal_projector.*`` and ``lm_head.*``;
the published checkpoint, vLLM's model and transformers 4 use
``language_model.model.*``, ``audio_tower.*``, ``multi_modal_projector.*``
and ``language_model.lm_head.*``. The vLLM model maps adapter keys with this
table, and the tiny checkpoint is written with it. No vLLM import here.
"""

from __future__ import annotations

TRANSFORMERS5_TO_PUBLISHED: dict[str, str] = {
    "model.language_model.": "language_model.model.",
    "model.audio_tower.": "audio_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}


def published_name(name: str) -> str:
    """A transformers 5 parameter name in the published layout; ``ValueError`` for an unknown prefix."""
    for old, new in TRANSFORMERS5_TO_PUBLISHED.items():
        if name.startswith(old):
            return new + name[len(old) :]
    raise ValueError(f"unexpected parameter name {name!r}")
