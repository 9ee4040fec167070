"""The scoring prompt: CEFR rubric in the system turn, the answer's audio in the user turn.

The rubric comes first so that every request of a part shares the same token
prefix, which vLLM's prefix cache reuses across requests. A part with analytic
aspects has their rubrics there too, and each aspect's request differs from the
holistic one only by its question after the audio. Training builds its
inputs with the same functions, so serving sees exactly what the adapter
learned on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from serve.grading.levels import Level

AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"

DEFAULT_TASK = "The candidate answers one part of a speaking test."

SYSTEM_TEMPLATE = (
    "You are an examiner of spoken English. {task}\n"
    "Judge the candidate's overall speaking proficiency from the recording: "
    "fluency, pronunciation, grammar, vocabulary and how well the answer is "
    "organised. The levels are:\n"
    "{levels}\n"
    "{aspects}"
    "Reply with the letter of one level and nothing else."
)

#: The system turn's part for a part with analytic aspects: each aspect's description and levels.
ASPECTS_TEMPLATE = (
    "You may be asked about one aspect of the answer instead. The aspects and their levels are:\n{aspects}\n"
)

QUESTION = "Which level is this answer? Reply with one letter."

ASPECT_QUESTION = "Which level is this answer's {title}? Reply with one letter."


@dataclass(frozen=True)
class AspectRubric:
    """An aspect as the prompt shows it: its title, what it judges, its levels."""

    title: str
    description: str
    levels: tuple[Level, ...]


def rubric(levels: Sequence[Level]) -> str:
    """One line per level: ``A (A1): descriptor``."""
    return "\n".join(f"{lv.label} ({lv.cefr}): {lv.descriptor}" for lv in levels)


def aspects_rubric(aspects: Sequence[AspectRubric]) -> str:
    """The aspects' part of the system turn (empty without aspects: the prompt is then exactly the holistic one)."""
    if not aspects:
        return ""
    blocks = "\n".join(f"{a.title.capitalize()}: {a.description.strip()}\n{rubric(a.levels)}" for a in aspects)
    return ASPECTS_TEMPLATE.format(aspects=blocks)


def system_message(task: str, levels: Sequence[Level], aspects: Sequence[AspectRubric] = ()) -> str:
    """The system turn of a part's prompt: its task, its levels and, for a part with aspects, theirs."""
    return SYSTEM_TEMPLATE.format(task=task.strip(), levels=rubric(levels), aspects=aspects_rubric(aspects))


def _chat(system: str, question: str) -> str:
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\nAudio 1: {AUDIO_PLACEHOLDER}\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def build_prompt(task: str, levels: Sequence[Level], aspects: Sequence[AspectRubric] = ()) -> str:
    """The full ChatML prompt text of the holistic score, ending where the model's answer (one label) starts."""
    return _chat(system_message(task, levels, aspects), QUESTION)


def build_aspect_prompt(task: str, levels: Sequence[Level], aspects: Sequence[AspectRubric], title: str) -> str:
    """An aspect's prompt: the part's prompt up to the end of the audio, then the aspect's one-line question.

    The rubric of every aspect is in the system turn, before the audio, so with the part's adapter vLLM's prefix
    cache computes the rubric and the audio once for the holistic score and all aspects of an answer: each aspect
    adds a short suffix (its question), not a request of its own."""
    return _chat(system_message(task, levels, aspects), ASPECT_QUESTION.format(title=title))
