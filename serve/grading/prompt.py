"""The scoring prompt: CEFR rubric in the system turn, the answer's audio in the user turn.

The rubric comes first so that every request of a part shares the same token
prefix, which vLLM's prefix cache reuses across requests. Training builds its
inputs with the same functions, so serving sees exactly what the adapter
learned on.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def rubric(levels: Sequence[Level]) -> str:
    """One line per level: ``A (A1): descriptor``."""
    return "\n".join(f"{lv.label} ({lv.cefr}): {lv.descriptor}" for lv in levels)


def system_message(task: str, levels: Sequence[Level]) -> str:
    """The system turn of a part's prompt."""
    return SYSTEM_TEMPLATE.format(task=task.strip(), levels=rubric(levels))


def build_prompt(task: str, levels: Sequence[Level]) -> str:
    """The full ChatML prompt text, ending where the model's answer (one label) starts."""
    return (
        f"<|im_start|>system\n{system_message(task, levels)}<|im_end|>\n"
        f"<|im_start|>user\nAudio 1: {AUDIO_PLACEHOLDER}\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


ASPECT_QUESTION = (
    "Now judge only the candidate's {title}: {description} The levels of {title} are:\n"
    "{levels}\n"
    "Which level is this answer's {title}? Reply with one letter."
)


def build_aspect_prompt(
    task: str, levels: Sequence[Level], title: str, description: str, aspect_levels: Sequence[Level]
) -> str:
    """An aspect's prompt: the part's prompt up to the end of the audio, then the aspect's question and levels.

    Everything before the question is the holistic prompt's own prefix, so with the same adapter vLLM's prefix
    cache computes the rubric and the audio once for the holistic score and all aspects of an answer."""
    question = ASPECT_QUESTION.format(title=title, description=description.strip(), levels=rubric(aspect_levels))
    return (
        f"<|im_start|>system\n{system_message(task, levels)}<|im_end|>\n"
        f"<|im_start|>user\nAudio 1: {AUDIO_PLACEHOLDER}\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
