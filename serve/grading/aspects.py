"""Analytic aspects of a spoken answer: what each one judges, and its descriptors per CEFR level.

A part may list aspects beside its holistic score (``parts.<part>.aspects``
in the config). The four built in here follow the CEFR Companion Volume's
qualitative aspects of spoken language use (fluency, phonological control,
range and accuracy, coherence); a config may define others with their own
description and levels.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinAspect:
    """What an aspect judges, in one sentence for the prompt, and its descriptor per CEFR level."""

    description: str
    descriptors: dict[str, str]  # CEFR level (A1 ... C2) -> descriptor


BUILTIN_ASPECTS: dict[str, BuiltinAspect] = {
    "fluency": BuiltinAspect(
        "how smoothly the candidate speaks: speaking rate, pauses and hesitations.",
        {
            "A1": "Very short, isolated utterances; many pauses to search for words.",
            "A2": "Short phrases; pauses, false starts and reformulation are very evident.",
            "B1": "Keeps going comprehensibly; pauses for planning and repair in longer stretches.",
            "B2": "Fairly even tempo; few noticeably long pauses.",
            "C1": "Fluent and spontaneous, almost effortless; only a conceptually difficult subject slows it.",
            "C2": "Natural, effortless and uninterrupted flow, like a proficient speaker.",
        },
    ),
    "pronunciation": BuiltinAspect(
        "how clearly the candidate's sounds, stress and intonation come across.",
        {
            "A1": "Sounds and stress often hard to understand; strong influence of other languages.",
            "A2": "Generally clear enough to be understood; listeners must sometimes ask for repetition.",
            "B1": "Generally intelligible; some sounds and stress patterns are mispronounced.",
            "B2": "Clear pronunciation and intonation; occasional slips do not impede understanding.",
            "C1": "Varies intonation and stress correctly to express finer shades of meaning.",
            "C2": "Precise articulation; intonation and stress like a proficient speaker's.",
        },
    ),
    "language_use": BuiltinAspect(
        "the range and accuracy of the candidate's grammar and vocabulary.",
        {
            "A1": "A few memorised words and phrases; little control of simple grammar.",
            "A2": "Simple structures with basic mistakes; a limited stock of everyday words.",
            "B1": "Enough language to get by; reasonably accurate in familiar contexts.",
            "B2": "Good range; a relatively high degree of grammatical control; errors rarely confuse.",
            "C1": "Broad range of vocabulary and structures; consistently accurate, rare errors.",
            "C2": "Full, precise and flexible command of grammar and vocabulary.",
        },
    ),
    "coherence": BuiltinAspect(
        "how well the answer is organised and its ideas linked.",
        {
            "A1": "Words or groups of words linked with very basic connectors such as 'and' or 'then'.",
            "A2": "Simple groups of words linked with 'and', 'but' and 'because'.",
            "B1": "A linear sequence of points, connected into a simple, understandable answer.",
            "B2": "Clear, well-organised points linked with a range of connectors; some jumps.",
            "C1": "Clear, smoothly flowing, well-structured speech with controlled organisation.",
            "C2": "Coherent, cohesive discourse that makes full and appropriate use of organisation.",
        },
    ),
}

#: Most aspects a part may list: each one adds a short request per chunk of every answer.
MAX_ASPECTS = 8


def title(aspect: str) -> str:
    """An aspect id as words: ``language_use`` -> ``language use``."""
    return aspect.replace("_", " ").replace("-", " ")
