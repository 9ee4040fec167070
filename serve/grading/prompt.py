"""The scoring prompt: CEFR rubric in the system turn, the answer's audio in the user turn.

The rubric comes first so that every request of a part shares the same token
prefix, which vLLM's prefix cache reuses across requests. The holistic prompt
is the same whatever analytic aspects a part has: an aspect's request shares
the holistic one up to the end of the audio, then describes the aspect and its
levels and asks for its level. Adding, removing or rewording an aspect thus
never moves the holistic score. Training builds its inputs with the same
functions, so serving sees exactly what the adapter learned on.
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
    "Reply with the letter of one level and nothing else."
)

QUESTION = "Which level is this answer? Reply with one letter."

#: An aspect's question, after the audio: what the aspect judges, its levels, then the question.
ASPECT_QUESTION = (
    "Judge only one aspect of this answer: its {title}. {description}\nThe levels of {title} are:\n{levels}\n"
    "Which level is this answer's {title}? Reply with one letter."
)


@dataclass(frozen=True)
class AspectRubric:
    """An aspect as the prompt shows it: its title, what it judges, its levels."""

    title: str
    description: str
    levels: tuple[Level, ...]


def rubric(levels: Sequence[Level]) -> str:
    """One line per level: ``A (A1): descriptor``."""
    return "\n".join(f"{lv.label} ({lv.cefr}): {lv.descriptor}" for lv in levels)


def system_message(task: str, levels: Sequence[Level]) -> str:
    """The system turn of a part's prompt: its task and its levels."""
    return SYSTEM_TEMPLATE.format(task=task.strip(), levels=rubric(levels))


def _chat(system: str, question: str) -> str:
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\nAudio 1: {AUDIO_PLACEHOLDER}\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def build_prompt(task: str, levels: Sequence[Level]) -> str:
    """The full ChatML prompt text of the holistic score, ending where the model's answer (one label) starts."""
    return _chat(system_message(task, levels), QUESTION)


def build_aspect_prompt(task: str, levels: Sequence[Level], aspect: AspectRubric) -> str:
    """An aspect's prompt: the holistic prompt up to the end of the audio, then the aspect's rubric and question.

    With the part's adapter, vLLM's prefix cache computes the rubric and the audio once for the holistic score and
    all aspects of an answer: each aspect adds its own suffix, not a request of its own."""
    question = ASPECT_QUESTION.format(
        title=aspect.title, description=aspect.description.strip(), levels=rubric(aspect.levels)
    )
    return _chat(system_message(task, levels), question)
