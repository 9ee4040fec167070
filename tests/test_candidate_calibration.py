"""The overall interval from a candidate-level calibration (no engine): on simulated candidates it covers the human
overall score at its nominal coverage where the parts' union bound over-covers and is wider; a changed weight or
part makes it stale and the result falls back to the union bound, saying why; several answers to a part count as
before; ``calibrate-candidates`` fits it from tables of machine and human overall scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from adapters.candidate_calibrate import calibrate_candidates, read_scores
from serve.grading import candidate_calibration as cc
from serve.grading.answers import candidate_result
from serve.grading.calibration import CalibrationState
from serve.grading.config import CandidateConfig, GraderConfig
from serve.grading.levels import DEFAULT_LEVELS
from serve.grading.parts import Part, candidate_intervals_of
from tests.test_candidate import LEVELS, scored

PARTS = ("interview", "long_turn", "read_aloud")
EXAM = {"interview": {"weight": 2}, "long_turn": {"weight": 1}, "read_aloud": {"weight": 1}}
WEIGHTS = {"interview": 0.5, "long_turn": 0.25, "read_aloud": 0.25}
SCALE = (1.0, 6.0)
ALPHA, ANSWER_SD = 0.1, 0.5


def part_fps(**changed: dict[str, str]) -> dict[str, dict[str, str]]:
    fps = {p: {"adapter": f"{p}-a1", "base_model": "tiny@hub", "prompt": "p", "scale": "s"} for p in PARTS}
    for p, over in changed.items():
        fps[p] = {**fps[p], **over}
    return fps


def simulate(n: int, rng: np.random.Generator, exam: CandidateConfig):
    """n candidates: each part answered 1-3 times (clustered answers of one ability), each answer's human score
    the ability plus the answer's own variation, the machine's the human plus noise with a 90 % interval from the
    noise's quantile; the human overall is the rule on the answers' human scores plus the rater's noise."""
    half = ANSWER_SD * 1.6448536269514722
    results, truth = [], []
    for _ in range(n):
        ability = rng.uniform(1.5, 5.5)
        human = {p: ability + rng.normal(0, 0.4, int(rng.integers(1, 4))) for p in PARTS}
        answers = [
            scored(p, float(h + rng.normal(0, ANSWER_SD)), half, 1 - ALPHA) for p, hs in human.items() for h in hs
        ]
        results.append(answers)
        truth.append(sum(WEIGHTS[p] * float(np.mean(hs)) for p, hs in human.items()) + rng.normal(0, 0.2))
    return results, np.array(truth)


def fitted(exam: CandidateConfig, n: int, rng, fps=None) -> cc.CandidateCalibration:
    answers, human = simulate(n, rng, exam)
    scores = [candidate_result(a, LEVELS, exam).score for a in answers]
    return cc.fit(cc.fingerprint(exam, fps or part_fps()), SCALE, [lv.score for lv in DEFAULT_LEVELS], human, scores)


def served(cal: cc.CandidateCalibration, method: str, coverage: float = 0.9) -> cc.CandidateIntervals:
    return cc.CandidateIntervals(CalibrationState(cal, "calibrated", "simulated"), coverage, method)


@pytest.mark.parametrize("method", cc.METHODS)
def test_the_candidate_calibrated_interval_covers_at_its_target_where_the_union_bound_over_covers(method):
    rng = np.random.default_rng(11)
    exam = CandidateConfig.model_validate({"parts": EXAM})
    n_cal, n_test, c = 2000, 2000, 0.9
    intervals = served(fitted(exam, n_cal, rng), method, c)
    answers, human = simulate(n_test, rng, exam)
    cal_hit, union_hit, cal_width, union_width, predicted, stated = [], [], [], [], [], []
    for a, h in zip(answers, human):
        got = candidate_result(a, LEVELS, exam, intervals)
        union = candidate_result(a, LEVELS, exam)
        assert got.score == union.score and got.by_part == union.by_part  # the interval's source changes no score
        assert got.interval.method == "candidate_calibration" and got.interval_status == "candidate_calibration"
        assert got.candidate_calibration == "calibrated" and got.interval.calibrated_on == n_cal
        assert got.interval.answers == union.interval.answers == len(a)
        assert union.interval.method == "union_bound" and union.candidate_calibration == "uncalibrated"
        cal_hit.append(got.interval.low <= h <= got.interval.high)
        union_hit.append(union.interval.low <= h <= union.interval.high)
        cal_width.append(got.interval.width)
        union_width.append(union.interval.width)
        stated.append(union.interval.coverage)
        predicted.append(round(got.score))
    realised, union_cov = float(np.mean(cal_hit)), float(np.mean(union_hit))
    # conformal: the coverage conditional on the calibration set varies by ~ sqrt(c (1 - c) / n_cal), the test
    # set's share by ~ sqrt(c (1 - c) / n_test); three of their combined sd either side, plus the 1 / (n + 1) step
    tol = 3 * math.sqrt(c * (1 - c) * (1 / n_cal + 1 / n_test)) + 1 / (n_cal + 1)
    print(
        f"{method}: n_cal={n_cal}, n_test={n_test}: calibrated {realised:.3f} (target {c}, +-{tol:.3f}), mean width "
        f"{np.mean(cal_width):.3f}; union bound {union_cov:.3f} (stated {min(stated):.2f}-{max(stated):.2f}), mean "
        f"width {np.mean(union_width):.3f}"
    )
    assert abs(realised - c) <= tol
    assert union_cov > c + tol  # the union bound over-covers...
    assert np.mean(union_width) > 1.2 * np.mean(cal_width)  # ...by being wider
    if method == "mondrian":  # per predicted level, where it holds by construction
        levels = np.asarray(predicted)
        hits = np.asarray(cal_hit)
        for lv in sorted(set(predicted)):
            sel = levels == lv
            if sel.sum() >= 200:
                cov = hits[sel].mean()
                assert abs(cov - c) <= 3 * math.sqrt(c * (1 - c) * (1 / 30 + 1 / sel.sum())), (lv, cov, sel.sum())


def test_a_changed_weight_or_part_makes_the_calibration_stale_and_the_result_falls_back(tmp_path):
    path = tmp_path / "candidates.calibration.json"
    rule = {"parts": EXAM, "calibration": {"path": str(path), "method": "absolute"}}
    exam = CandidateConfig.model_validate(rule)
    cc.write(fitted(exam, 200, np.random.default_rng(3)), path)
    answers = [scored("interview", 3.0), scored("interview", 3.4), scored("long_turn", 4.0), scored("read_aloud", 2.5)]

    def result(rule_: dict, fps=None):
        exam_ = CandidateConfig.model_validate(rule_)
        return candidate_result(answers, LEVELS, exam_, cc.candidate_intervals(exam_, fps or part_fps()))

    fresh = result(rule)
    assert fresh.interval.method == "candidate_calibration" and fresh.candidate_calibration == "calibrated"
    assert "200 candidates" in fresh.interval_detail
    # what changes no overall score keeps it: all weights scaled alike, the cut scores, the union bound's floor
    same = result({**rule, "parts": {p: {"weight": 2 * c["weight"]} for p, c in EXAM.items()}})
    assert same.interval == fresh.interval
    assert (
        result({**rule, "cuts": [{"cefr": "B1", "min_score": 3}], "interval_coverage": 0.5}).interval == fresh.interval
    )
    for changed, fps, component in [
        ({**rule, "parts": {**EXAM, "long_turn": {"weight": 2}}}, None, "long_turn.counting"),
        ({**rule, "parts": {**EXAM, "read_aloud": {"weight": 1, "unscorable": {"count_as": 1}}}}, None, "read_aloud"),
        ({**rule, "unscorable": {"count_as": 1}}, None, "rule"),
        ({**rule, "parts": {**EXAM, "extra": {"weight": 1, "required": False}}}, None, "parts"),
        (rule, part_fps(long_turn={"adapter": "long_turn-a2"}), "long_turn.adapter"),
        (rule, part_fps(interview={"scale": "s2"}), "interview.scale"),
    ]:
        got = result(changed, fps)
        assert got.candidate_calibration == "stale_calibration", component
        assert got.interval.method == "union_bound" and got.interval_status == "union_bound"
        assert component in got.interval_detail and "candidate calibration not used" in got.interval_detail
    path.write_text("{not json")
    broken = result(rule)
    assert broken.candidate_calibration == "invalid_calibration" and broken.interval.method == "union_bound"
    path.unlink()
    gone = result(rule)
    assert gone.candidate_calibration == "uncalibrated" and "no candidate calibration file" in gone.interval_detail
    for r in (fresh, same, broken, gone):
        assert str(tmp_path) not in r.interval_detail  # a result names no server path
    none = candidate_result(answers, LEVELS, CandidateConfig.model_validate({"parts": EXAM}))
    assert none.candidate_calibration == "uncalibrated" and "not configured" not in none.interval_detail
    assert "candidate.calibration" in none.interval_detail


def test_the_calibration_serves_where_the_parts_have_no_interval_and_never_a_withheld_result(tmp_path):
    exam = CandidateConfig.model_validate({"parts": {"interview": {}, "long_turn": {}}})
    cal = fitted(CandidateConfig.model_validate({"parts": EXAM}), 100, np.random.default_rng(5))
    intervals = served(cal, "absolute")
    no_part_interval = [scored("interview", 3.0), scored("long_turn", 3.0, None)]
    assert candidate_result(no_part_interval, LEVELS, exam).interval_status == "uncalibrated"
    got = candidate_result(no_part_interval, LEVELS, exam, intervals)
    assert got.interval_status == "candidate_calibration" and got.interval.low < 3.0 < got.interval.high
    withheld = candidate_result([scored("interview", 3.0)], LEVELS, exam, intervals)  # long_turn missing
    assert withheld.withheld and withheld.interval is None and withheld.interval_status == "withheld"
    assert withheld.candidate_calibration == "calibrated"


def test_calibrate_candidates_fits_from_tables_and_the_doors_see_it(tmp_path, capsys):
    path = tmp_path / "cal" / "candidates.json"
    cfg = GraderConfig.model_validate(
        {
            "model": {"base": "tiny"},
            "parts": {"interview": {}, "long_turn": {}},
            "candidate": {
                "parts": {"interview": {"weight": 1}, "long_turn": {"weight": 1}},
                "calibration": {"path": str(path)},
            },
        }
    )
    parts = {name: Part(name, pcfg, None) for name, pcfg in cfg.parts.items()}
    rng = np.random.default_rng(9)
    ids = [f"{i:03d}" for i in range(60)]  # leading zeros: ids are read as text
    machine = rng.uniform(1.5, 5.5, len(ids))
    (tmp_path / "machine.csv").write_text(
        "candidate_id,score\n" + "".join(f"{c},{m:.4f}\n" for c, m in zip(ids, machine)) + "999,\n"
    )
    (tmp_path / "human.tsv").write_text(
        "candidate_id\tscore\n"
        + "".join(f"{c}\t{np.clip(m + rng.normal(0, 0.3), 1, 6):.4f}\n" for c, m in zip(ids, machine))
    )
    assert list(read_scores(tmp_path / "human.tsv")[0])[:2] == ["000", "001"]
    with pytest.raises(ValueError, match="60 candidates: .* bring that within 5 points"):
        calibrate_candidates(cfg, parts, tmp_path / "human.tsv", candidates_file=tmp_path / "machine.csv")
    cal = calibrate_candidates(
        cfg, parts, tmp_path / "human.tsv", candidates_file=tmp_path / "machine.csv", allow_small=True
    )
    out = capsys.readouterr().out
    assert cal.n == 60 and cal.small_sample is not None and cal.candidates[0] == "000"
    assert "mondrian" in out and "absolute" in out and f"wrote {path}" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["n"] == 60 and {r["method"] for r in summary["rows"]} == set(cc.METHODS)
    intervals = candidate_intervals_of(cfg, parts)
    assert intervals.state.status == "calibrated"
    got = candidate_result([scored("interview", 3.0), scored("long_turn", 4.0)], LEVELS, cfg.candidate, intervals)
    assert got.interval.method == "candidate_calibration" and got.interval.calibrated_on == 60
    reweighted = cfg.model_copy(deep=True)
    reweighted.candidate.parts["long_turn"].weight = 3
    assert candidate_intervals_of(reweighted, parts).state.status == "stale_calibration"
    with pytest.raises(ValueError, match="one of --session or --candidates"):
        calibrate_candidates(cfg, parts, tmp_path / "human.tsv")


def test_calibrate_candidates_from_a_session_and_its_candidates_table_uses_it(tmp_path, capsys):
    """A session's answers (several per part) are combined by the config's rule, fitted beside the union bound on
    the same candidates, and the candidates table the session writes then carries the calibrated interval; a session
    scored by another adapter is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from serve.session.schema import ANSWER_SCHEMA
    from serve.session.stages import answer_row
    from serve.session.store import OutputDir

    path = tmp_path / "candidates.json"
    cfg = GraderConfig.model_validate(
        {
            "model": {"base": "tiny"},
            "parts": {p: {} for p in PARTS},
            "candidate": {"parts": EXAM, "calibration": {"path": str(path), "method": "absolute"}},
        }
    )
    parts = {name: Part(name, pcfg, None) for name, pcfg in cfg.parts.items()}
    rng = np.random.default_rng(4)
    results, human = simulate(150, rng, cfg.candidate)
    rows = [
        answer_row({"response_id": f"c{i}-{j}", "candidate_id": f"c{i}", "part": a.part, "audio": "x.wav"}, a)
        for i, answers in enumerate(results)
        for j, a in enumerate(answers)
    ]
    store = OutputDir(str(tmp_path / "out"))
    writer = store.part_writer(100_000, 60)
    writer.add(pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA))
    writer.flush()
    (tmp_path / "human.csv").write_text("candidate_id,score\n" + "".join(f"c{i},{h}\n" for i, h in enumerate(human)))
    cal = calibrate_candidates(cfg, parts, tmp_path / "human.csv", session=str(tmp_path / "out"))
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert cal.n == 150 and summary["union_bound"]["n"] == 150
    assert summary["union_bound"]["coverage"] > 0.95 and "the parts' union bound on the same 150" in out
    assert any(b["kind"] == "answers" for b in summary["rows"][0]["bins"])  # per number of scored answers
    assert cal.score[cal.candidates.index("c0")] == pytest.approx(
        candidate_result(results[0], LEVELS, cfg.candidate).score
    )
    intervals = candidate_intervals_of(cfg, parts)
    assert store.write_candidates(parts, cfg.candidate, intervals) == 150
    table = pq.read_table(str(tmp_path / "out" / "candidates.parquet")).to_pylist()
    assert {r["interval"]["method"] for r in table} == {"candidate_calibration"}
    assert {r["candidate_calibration"] for r in table} == {"calibrated"}
    from adapters.evaluate import session_candidates  # evaluate --session's door

    by_evaluate = session_candidates(cfg, store.read_all())
    assert {o.interval.method for o in by_evaluate} == {"candidate_calibration"}
    rows[0]["model"] = {**rows[0]["model"], "adapter_hash": "0123abcd"}
    other = OutputDir(str(tmp_path / "other"))
    writer = other.part_writer(100_000, 60)
    writer.add(pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA))
    writer.flush()
    with pytest.raises(ValueError, match="scored by adapter 0123abcd"):
        calibrate_candidates(cfg, parts, tmp_path / "human.csv", session=str(tmp_path / "other"))


def test_calibrate_candidates_refuses_tables_it_cannot_trust_in_one_line(tmp_path, capsys):
    """The same file as machine and human scores, a score off the exam's scale, NaN, a folder, a missing session:
    each refused with a line that names it; empty scores are left out and counted, each candidate once."""
    cfg = GraderConfig.model_validate(
        {
            "model": {"base": "tiny"},
            "parts": {"interview": {}},
            "candidate": {"calibration": {"path": str(tmp_path / "cal.json")}},
        }
    )
    parts = {name: Part(name, pcfg, None) for name, pcfg in cfg.parts.items()}
    rows = [(f"k{i}", 1.5 + 4 * i / 39) for i in range(40)]

    def table(name: str, extra: str = "", shift: float = 0.0) -> Path:
        path = tmp_path / name
        path.write_text("candidate_id,score\n" + "".join(f"{c},{v + shift:.3f}\n" for c, v in rows) + extra)
        return path

    machine, human = table("machine.csv", "k40,\n"), table("human.csv", "k41,\nk42,3.0\n", shift=0.2)

    def refused(match: str, **kw) -> None:
        with pytest.raises(ValueError, match=match):
            calibrate_candidates(cfg, parts, kw.pop("human", human), allow_small=True, **kw)

    refused("the same for every candidate", candidates_file=machine, human=table("copy.csv"))
    off = _write(tmp_path / "off.csv", "candidate_id,score\nk9,7.5\n")
    refused("score 7.5 of candidate 'k9' is off the exam's scale 1-6", candidates_file=machine, human=off)
    nan = _write(tmp_path / "nan.csv", "candidate_id,score\nk1,nan\n")
    refused("candidate 'k1' is nan", candidates_file=machine, human=nan)
    refused("is a folder", candidates_file=tmp_path)
    refused("no such folder", session=str(tmp_path / "nowhere"))
    refused("a candidates table goes with --candidates", session=str(machine))

    cal = calibrate_candidates(cfg, parts, human, candidates_file=machine, allow_small=True)
    err = capsys.readouterr().err
    assert cal.n == 40 and "its scores are taken to be this exam's overall scores" in err
    assert "left out: 1 withheld, 0 without a human score, 1 with an empty human score, 1 human scores without" in err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
