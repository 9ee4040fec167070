"""The CEFR-aligned scale: levels, their descriptors, and the labels the model emits.

The model answers with one option label per level (letters, as in the paper);
each label stands for one CEFR level and one numeric score (1 = A1 ... 6 = C2).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Level(BaseModel):
    """One point of the scale: the label token the model emits and what it stands for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(min_length=1, description="Option label the model answers with (one token).")
    cefr: str = Field(min_length=1, description="CEFR level this label stands for, e.g. 'B1'.")
    score: float = Field(description="Numeric score of this level on the reporting scale.")
    descriptor: str = Field(min_length=1, description="Holistic description shown to the model.")


# Holistic descriptors of spoken performance, written for this project after the
# CEFR's overall spoken production/interaction scales.
DEFAULT_LEVELS: tuple[Level, ...] = (
    Level(
        label="A",
        cefr="A1",
        score=1.0,
        descriptor=(
            "Isolated words and memorised phrases; long pauses; pronunciation often "
            "hard to follow; relies heavily on repetition."
        ),
    ),
    Level(
        label="B",
        cefr="A2",
        score=2.0,
        descriptor=(
            "Short simple sentences about familiar topics; frequent pauses and "
            "reformulation; basic errors are common but the message is mostly clear."
        ),
    ),
    Level(
        label="C",
        cefr="B1",
        score=3.0,
        descriptor=(
            "Connected speech on familiar topics as a linear sequence of points; "
            "noticeable pausing for grammar and vocabulary; generally intelligible."
        ),
    ),
    Level(
        label="D",
        cefr="B2",
        score=4.0,
        descriptor=(
            "Clear, detailed speech on a wide range of topics; develops arguments "
            "with some fluency; few errors that cause misunderstanding."
        ),
    ),
    Level(
        label="E",
        cefr="C1",
        score=5.0,
        descriptor=(
            "Fluent, spontaneous and well-structured speech on complex topics; "
            "broad vocabulary; searching for expressions is rarely noticeable."
        ),
    ),
    Level(
        label="F",
        cefr="C2",
        score=6.0,
        descriptor=(
            "Effortless, precise and natural speech with fine shades of meaning; "
            "near-native control of grammar, vocabulary and pronunciation."
        ),
    ),
)


def nearest_level(levels: tuple[Level, ...] | list[Level], score: float) -> Level:
    """The level whose score is closest to ``score`` (ties go to the higher level)."""
    return min(levels, key=lambda lv: (abs(lv.score - score), -lv.score))
