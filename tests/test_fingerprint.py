"""A calibration goes stale with every kind of change that moves a score, and only with those."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from adapters.agreement import aspect_validation
from serve.grading import calibration
from serve.grading.adapter_files import AdapterFiles
from serve.grading.answers import answer_result
from serve.grading.audio import PreparedAnswer
from serve.grading.calibration import AspectCalibration, AspectValidation
from serve.grading.config import AudioConfig, EngineConfig, GraderConfig, PartConfig
from serve.grading.fingerprint import score_fingerprint
from serve.grading.levels import DEFAULT_LEVELS
from serve.grading.parts import (
    CalibrationRequiredError,
    Part,
    aspect_fingerprints,
    aspect_prompt,
    part_fingerprint,
    part_intervals,
    resolve_part,
)
from serve.grading.prompt import AUDIO_PLACEHOLDER, build_prompt
from serve.grading.scoring import ChunkScore
from tests.fake_engine import LetterTokenizer
from tests.test_review import CLEAN

BASE = "Qwen/Qwen2-Audio-7B-Instruct"


def fp(pcfg: PartConfig | None = None, adapter: str | None = "abc", base: str = BASE, audio=None, engine=None):
    return score_fingerprint(
        pcfg or PartConfig(), adapter, base=base, audio=audio or AudioConfig(), engine=engine or EngineConfig()
    )


def relabel(**changes):
    return tuple(DEFAULT_LEVELS[0].model_copy(update=changes) if i == 0 else lv for i, lv in enumerate(DEFAULT_LEVELS))


CHANGES = {
    "adapter": dict(adapter="def"),
    "base_model": dict(base="Qwen/Qwen2-Audio-7B"),
    "prompt (task)": dict(pcfg=PartConfig(task="The candidate describes a picture.")),
    "prompt (descriptor)": dict(pcfg=PartConfig(levels=relabel(descriptor="Hardly any English."))),
    "scale": dict(pcfg=PartConfig(levels=relabel(score=0.5))),
    "audio (vad threshold)": dict(audio=AudioConfig(vad_threshold=0.6)),
    "audio (chunk length)": dict(audio=AudioConfig(max_chunk_s=20.0)),
    "audio (pause cutting)": dict(audio=AudioConfig(cut_at_pauses=False)),
    "audio (pause search)": dict(audio=AudioConfig(pause_search_s=2.0)),
    "audio (shortest pause)": dict(audio=AudioConfig(min_pause_s=0.5)),
    "audio (extra chunks)": dict(audio=AudioConfig(max_extra_chunks=0)),
    "audio (detector)": dict(audio=AudioConfig(speech_detector="loudness")),
    "engine (dtype)": dict(engine=EngineConfig(dtype="bfloat16")),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_each_kind_of_change_makes_the_calibration_stale(change):
    before, after = fp(), fp(**CHANGES[change])
    changed = calibration.stale_components(before, after)
    assert changed == [change.split(" ")[0]], changed


def test_changes_that_do_not_move_a_score_keep_it():
    same = [
        fp(pcfg=PartConfig(aspects=["fluency", "pronunciation"])),  # aspects are asked after the audio
        fp(audio=AudioConfig(max_duration_s=60.0, max_upload_mb=5.0, vad_threads=2)),
        fp(engine=EngineConfig(max_num_seqs=8, max_loras=2, seed=3)),
        fp(pcfg=PartConfig(review={"max_score_sd": 0.5}, interval={"coverage": 0.8})),
    ]
    assert all(calibration.stale_components(fp(), f) == [] for f in same)


def _part(tmp_path, pcfg: PartConfig) -> tuple[Part, GraderConfig]:
    cfg = GraderConfig(model={"base": BASE}, parts={"p": pcfg})
    return Part("p", pcfg, AdapterFiles(tmp_path, 16, "abc")), cfg


def test_serving_reads_the_calibration_logs_why_not_and_fails_closed_when_required(tmp_path, caplog):
    part, cfg = _part(tmp_path, PartConfig())
    assert part_intervals(part, cfg).state.status == "uncalibrated"
    serving = fp()
    calibration.write(
        calibration.fit("p", serving, (1.0, 6.0), [1, 2, 3, 4, 5, 6], [3.0] * 200, [3.1] * 200, [0.5] * 200),
        tmp_path,
    )
    assert part_intervals(part, cfg).state.status == "calibrated"
    edited = PartConfig(task="The candidate describes a picture.")
    part, cfg = _part(tmp_path, edited)
    with caplog.at_level(logging.WARNING, logger="serve.grading.parts"):
        state = part_intervals(part, cfg).state
    assert state.status == "stale_calibration" and "prompt" in state.detail
    assert any("stale_calibration" in r.getMessage() and "prompt" in r.getMessage() for r in caplog.records)
    required = edited.model_copy(update={"interval": edited.interval.model_copy(update={"require": True})})
    part, cfg = _part(tmp_path, required)
    with pytest.raises(CalibrationRequiredError, match="requires a valid calibration.*prompt"):
        part_intervals(part, cfg)


def test_holistic_prompt_is_the_same_whatever_the_aspects():
    plain, with_aspects = PartConfig(), PartConfig(aspects=["fluency", "pronunciation", "coherence"])
    assert build_prompt(plain.task, plain.levels) == build_prompt(with_aspects.task, with_aspects.levels)
    prompt = aspect_prompt(with_aspects, "fluency")
    audio_end = prompt.index(AUDIO_PLACEHOLDER) + len(AUDIO_PLACEHOLDER)
    holistic = build_prompt(plain.task, plain.levels)
    assert prompt[:audio_end] == holistic[:audio_end]  # the cached prefix is shared; the rubric comes after
    assert "aspect" not in holistic
    assert with_aspects.aspects["fluency"].description.strip() in prompt[audio_end:]


def _validation(validated: bool) -> AspectValidation:
    return AspectValidation(
        n=200,
        pcc_own=0.8,
        pcc_holistic=0.5,
        added_value_ci=(0.1, 0.4) if validated else (-0.1, 0.2),
        validated=validated,
        reason="test",
    )


def test_aspects_get_their_interval_and_validation_and_unvalidated_ones_can_be_withheld(tmp_path):
    pcfg = PartConfig(aspects=["fluency", "coherence", "pronunciation"])
    part, cfg = _part(tmp_path, pcfg)
    fps = aspect_fingerprints(part, cfg)
    records = dict(scale=(1.0, 6.0), level_scores=(1, 2, 3, 4, 5, 6), human=[3.0] * 50, score=[3.2] * 50)
    calibration.write(
        calibration.fit(
            "p",
            part_fingerprint(part, cfg),
            (1.0, 6.0),
            [1, 2, 3, 4, 5, 6],
            [3.0] * 200,
            [3.1] * 200,
            [0.5] * 200,
            aspects={
                "fluency": AspectCalibration(
                    fingerprint=fps["fluency"], score_sd=[0.4] * 50, validation=_validation(True), **records
                ),
                "coherence": AspectCalibration(
                    fingerprint=fps["coherence"], score_sd=[0.4] * 50, validation=_validation(False), **records
                ),
                # made for another prompt: stale
                "pronunciation": AspectCalibration(
                    fingerprint={**fps["pronunciation"], "prompt": "x"},
                    score_sd=[0.4] * 50,
                    validation=_validation(True),
                    **records,
                ),
            },
        ),
        tmp_path,
    )
    spec = resolve_part(part, LetterTokenizer(), cfg)
    got = {a.aspect: (a.validated, a.intervals.state.status) for a in spec.aspects}
    assert got == {
        "fluency": (True, "calibrated"),
        "coherence": (False, "calibrated"),
        "pronunciation": (False, "stale_calibration"),
    }
    probs = np.full(6, 1 / 6)
    chunk = [ChunkScore(0, 5, probs)]
    answer = answer_result(spec, PreparedAnswer([], CLEAN), chunk, {a: chunk for a in got})
    assert answer.aspects["fluency"].validated and answer.aspects["fluency"].interval is not None
    assert not answer.aspects["coherence"].validated and answer.aspects["coherence"].interval is not None
    assert answer.aspects["pronunciation"].interval is None
    assert answer.aspects["pronunciation"].interval_status == "stale_calibration"
    withheld = pcfg.model_copy(update={"withhold_unvalidated_aspects": True})
    part, cfg = _part(tmp_path, withheld)
    assert [a.aspect for a in resolve_part(part, LetterTokenizer(), cfg).aspects] == ["fluency"]


def test_aspect_validation_tells_an_echo_from_an_aspect_of_its_own():
    rng = np.random.default_rng(0)
    n = 300
    holistic_truth = rng.normal(3.5, 1.0, n)
    own_truth = 0.5 * holistic_truth + rng.normal(0, 0.8, n)  # an aspect with a part of its own
    holistic = holistic_truth + rng.normal(0, 0.3, n)
    echo = holistic + rng.normal(0, 0.05, n)  # an aspect score that only repeats the holistic one
    own = own_truth + rng.normal(0, 0.3, n)
    assert aspect_validation(own_truth, own, holistic).validated
    v = aspect_validation(own_truth, echo, holistic)
    assert not v.validated and "echoes" in v.reason and v.added_value_ci[0] < 0
    assert not aspect_validation(own_truth[:20], own[:20], holistic[:20]).validated  # too few answers
