"""Audio quality measured on decoded audio, and the review verdict built from it and the uncertainty."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.audio import encode
from serve.grading.audio import SAMPLE_RATE, prepare
from serve.grading.config import AudioConfig, ReviewConfig
from serve.grading.quality import MAX_SNR_DB, measure
from serve.grading.results import REVIEW_REASONS, Quality, Uncertainty
from serve.grading.review import review_reasons
from tests.audio_fixtures import speechlike

CLEAN = Quality(speech_s=8, speech_ratio=0.8, snr_db=40, clipped_fraction=0, speech_dbfs=-20)
SURE = Uncertainty(score_sd=0.3, entropy=0.2, label_mass=0.95, chunk_spread=0.0)


def with_gaps(wave: np.ndarray) -> np.ndarray:
    """Speech between true silences (as a synthesized answer has)."""
    gap = np.zeros(SAMPLE_RATE // 2, np.float32)
    return np.concatenate([gap, wave, gap, wave, gap])


def test_quality_of_clean_clipped_and_noisy_speech():
    rng = np.random.default_rng(0)
    clean = with_gaps(speechlike(4, seed=1))
    q = measure(clean, SAMPLE_RATE, -50)
    assert q.snr_db == MAX_SNR_DB and q.clipped_fraction == 0
    assert q.speech_s == pytest.approx(8.0, abs=0.05) and q.speech_ratio == pytest.approx(8 / 9.5, abs=0.01)
    assert -30 < q.speech_dbfs < -15

    clipped = np.clip(clean * 10, -1, 1)
    assert measure(clipped, SAMPLE_RATE, -50).clipped_fraction > 0.01

    noisy = clean + rng.normal(scale=np.sqrt(np.mean(clean[clean != 0] ** 2)), size=clean.size).astype(np.float32)
    qn = measure(noisy, SAMPLE_RATE, -50)
    assert qn.snr_db < 10 and qn.speech_ratio == 1.0

    quiet = with_gaps(speechlike(4, seed=1) * 0.01)
    assert measure(quiet, SAMPLE_RATE, -50).speech_dbfs < -50 + 15


def test_prepare_measures_quality_once_and_refuses_silence_from_it():
    p = prepare(encode(with_gaps(speechlike(4, seed=2)), SAMPLE_RATE), AudioConfig(speech_detector="loudness"))
    assert p.quality.speech_s == pytest.approx(8.0, abs=0.05)
    assert sum(c.duration_s for c in p.chunks) == pytest.approx(9.5)


def test_prepare_measures_espeak_speech_with_the_speech_detector(espeak_speech):
    wave = espeak_speech[0]
    p = prepare(encode(wave, SAMPLE_RATE), AudioConfig())
    q = p.quality
    assert q.speech_detector == "silero_vad" and 0.5 < q.speech_ratio < 1.0 and q.snr_db > 60
    assert -25 < q.speech_dbfs < -15 and not q.ends_in_speech
    assert sum(c.duration_s for c in p.chunks) == pytest.approx(len(wave) / SAMPLE_RATE, abs=0.01)


def test_cut_off_flags_answers_cut_mid_word_not_complete_ones(espeak_sentences):
    """The cut_off rule on 12 espeak-ng sentences (3 voices x 2 rates x 2 texts, conftest.espeak_sentences),
    through the grader's audio path: each whole (its trailing silence kept) and trimmed at the last millisecond
    above -50 dBFS (n = 24 complete answers: at most 5 % flagged, so at most 1), and cut 30, 50 and 70 % through
    its last word and through the word before it (n = 72 cut answers: at least 90 % flagged, so at least 65).

    Both texts end in a fading /z/; words espeak-ng stops at full loudness (a final vowel or /l/) are flagged
    trimmed too, as docs/trust.md measures ("Cut-off answers")."""
    from loadtest import cutoff_bench

    cfg = AudioConfig(min_speech_s=0.0)  # a cut early in the second text leaves little speech: the rule, not the check
    complete, cut, flagged = 0, 0, {}
    for a in espeak_sentences:
        for case, wave in cutoff_bench.cases(a).items():
            q = prepare(encode(wave, SAMPLE_RATE), cfg).quality
            hit = "cut_off" in review_reasons(SURE, q, ReviewConfig())
            assert hit == q.ends_in_speech
            complete += case in ("whole", "trimmed")
            cut += case not in ("whole", "trimmed")
            flagged.setdefault(case in ("whole", "trimmed"), []).append((hit, a.voice, a.rate, case))
    assert (complete, cut) == (24, 72)
    wrongly = [x for x in flagged[True] if x[0]]
    missed = [x for x in flagged[False] if not x[0]]
    assert len(wrongly) <= 1, wrongly
    assert len(missed) <= 7, missed
    cut_q = CLEAN.model_copy(update={"ends_in_speech": True})
    assert review_reasons(SURE, cut_q, ReviewConfig()) == ["cut_off"]
    assert review_reasons(SURE, cut_q, ReviewConfig(cut_off=False)) == []


@pytest.mark.parametrize(
    ("quality", "uncertainty", "reasons"),
    [
        (CLEAN, SURE, []),
        (CLEAN.model_copy(update={"snr_db": 3.0}), SURE, ["low_snr"]),
        (CLEAN.model_copy(update={"clipped_fraction": 0.02}), SURE, ["clipping"]),
        (CLEAN.model_copy(update={"speech_ratio": 0.1}), SURE, ["low_speech_ratio"]),
        (CLEAN, SURE.model_copy(update={"score_sd": 1.4}), ["uncertain"]),
        (CLEAN, SURE.model_copy(update={"label_mass": 0.005}), ["low_label_mass"]),
        (CLEAN, SURE.model_copy(update={"chunk_spread": 2.0}), ["chunks_disagree"]),
        (
            CLEAN.model_copy(update={"snr_db": 3.0, "clipped_fraction": 0.5}),
            SURE.model_copy(update={"score_sd": 2.0}),
            ["low_snr", "clipping", "uncertain"],
        ),
    ],
)
def test_review_reasons(quality, uncertainty, reasons):
    assert review_reasons(uncertainty, quality, ReviewConfig()) == reasons
    assert set(reasons) <= set(REVIEW_REASONS)


def test_a_null_threshold_turns_its_check_off():
    noisy = CLEAN.model_copy(update={"snr_db": -5.0})
    assert review_reasons(SURE, noisy, ReviewConfig(min_snr_db=None)) == []
    assert review_reasons(SURE, noisy, ReviewConfig(min_snr_db=-10)) == []


def test_overall_review_of_a_candidate():
    from serve.grading.results import Review
    from serve.grading.review import overall_review

    fine, clipped = Review(needed=False, reasons=[]), Review(needed=True, reasons=["uncertain", "clipping"])
    assert overall_review([fine, fine], 0) == Review(needed=False, reasons=[])
    assert overall_review([fine, clipped], 0).reasons == ["clipping", "uncertain"]
    assert overall_review([fine], 2) == Review(needed=True, reasons=["not_scorable"])
