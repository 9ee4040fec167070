"""A calibration goes stale with every kind of change that moves a score, and only with those."""

from __future__ import annotations

import logging

import pytest

from serve.grading import calibration
from serve.grading.adapter_files import AdapterFiles
from serve.grading.config import AudioConfig, EngineConfig, GraderConfig, PartConfig
from serve.grading.fingerprint import score_fingerprint
from serve.grading.levels import DEFAULT_LEVELS
from serve.grading.parts import CalibrationRequiredError, Part, part_intervals

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
