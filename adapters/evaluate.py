"""Evaluate a part's scores against human scores: agreement, selective scoring, groups, plot and report.

The answers come from one of two places, and the same report is made of both:

- a scored test set (:func:`evaluate`): every answer is decoded and chunked as
  in serving and sent to one :class:`serve.engine.offline.OfflineEngine` in
  one batch, through the same answer pipeline as every door;
- a session already scored in bulk (:func:`evaluate_session`): its answers'
  rows, joined by ``response_id`` with a file of human scores, without
  scoring again.

The soft and hard scores are compared with the human scores
(:mod:`adapters.agreement`; against a second human score too, where the data
has one: the human-human baseline), and so is each analytic aspect's score with
its own human score where the data has one, beside the cross matrix of each
aspect's scores against every aspect's human scores; a calibration plot of
predicted against human scores is drawn, :mod:`adapters.trust` measures how
well the answers' trust signals (audio quality, uncertainty, review verdict)
pick the answers to route to humans, and :mod:`adapters.fairness` how fair the
scores are across groups, for the part's answers and each candidate's overall
score; ``--report DIR`` puts it all in one HTML page (:mod:`adapters.report`).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapters import coverage
from adapters.agreement import (
    SECOND_HUMAN,
    all_metrics,
    aspect_agreement,
    format_aspects,
    format_baseline,
    format_metrics,
    human_baseline,
)
from adapters.dataset import Answer, DataError, answer_ids, load_answers, read_aspects, read_jsonl
from adapters.fairness import Row, fairness_report, format_fairness
from adapters.trust import SIGNALS, trust_report
from serve.grading import calibration
from serve.grading.adapter_files import check_adapter, training_record
from serve.grading.answers import candidate_result
from serve.grading.audio import PreparedAnswer
from serve.grading.classification import default_cuts, format_rudner, rudner, sd_of_interval
from serve.grading.config import VLLM_LORA_RANKS, CandidateConfig, GraderConfig
from serve.grading.fingerprint import score_fingerprint
from serve.grading.levels import Level
from serve.grading.results import Overall, ScoredAnswer


def config_for(cfg: GraderConfig, part: str, adapter: str | Path | None = None) -> GraderConfig:
    """A config holding only ``part`` (with ``adapter`` instead of the configured one, when given).

    The engine's ``max_lora_rank`` is raised to the adapter's rank when needed.
    """
    pcfg = cfg.part(part)
    engine = cfg.engine
    if adapter is not None:
        path = Path(adapter).expanduser().resolve()
        rank = check_adapter(path).rank
        pcfg = pcfg.model_copy(update={"adapter": path})
        if rank > engine.max_lora_rank:
            new_rank = min(r for r in VLLM_LORA_RANKS if r >= rank)
            print(f"note: adapter rank {rank}: engine.max_lora_rank raised to {new_rank}", file=sys.stderr)
            engine = engine.model_copy(update={"max_lora_rank": new_rank})
    return cfg.model_copy(update={"parts": {part: pcfg}, "engine": engine})


def score_with_engine(cfg: GraderConfig, part: str, answers: Sequence[Answer], engine=None) -> list[ScoredAnswer]:
    """Score every answer with one vLLM engine, all chunks in one batch: ``engine`` (an
    :class:`serve.engine.offline.OfflineEngine` that serves ``part``, kept open) or one started for ``cfg``."""
    from serve.engine.offline import OfflineEngine

    batch = [(part, PreparedAnswer(list(a.chunks), a.quality)) for a in answers]
    if engine is not None:
        return engine.score_answers(batch)
    scorer = OfflineEngine(cfg)
    try:
        return scorer.score_answers(batch)
    finally:
        scorer.shutdown()


def calibration_plot(
    path: str | Path,
    human: Sequence[float],
    soft: Sequence[float],
    hard: Sequence[float],
    title: str,
    level_scores: Sequence[float],
) -> Path:
    """Predicted against human scores: every answer (soft and hard), the mean per human-score bin, the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    h, s, hd = (np.asarray(x, dtype=float) for x in (human, soft, hard))
    lo, hi = min(level_scores), max(level_scores)
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="perfect agreement")
    ax.scatter(h, hd, s=10, alpha=0.35, color="tab:orange", label="hard (most probable level)")
    ax.scatter(h, s, s=12, alpha=0.6, color="tab:blue", label="soft (expected score)")
    edges = np.arange(lo - 0.5, hi + 1.0, 1.0)
    centres, means = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (h >= a) & (h < b)
        if sel.any():
            centres.append(h[sel].mean())
            means.append(s[sel].mean())
    ax.plot(centres, means, "o-", color="tab:red", lw=2, label="soft, mean per level bin")
    ax.set_xlim(lo - 0.3, hi + 0.3)
    ax.set_ylim(lo - 0.3, hi + 0.3)
    ax.set_xlabel("human score")
    ax.set_ylabel("predicted score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def default_plot_path(data: str | Path, part: str) -> Path:
    data = Path(data)
    return data.with_name(f"{data.stem}.{part}.calibration.png")


def _finite(m: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_trust(trust: dict) -> list[str]:
    """Human-readable lines: selective scoring per signal and the verdict."""
    rates = [r["review_rate"] for r in trust["selective"]]
    lines = [
        "selective scoring, PCC of the answers kept when the most doubtful are routed to review:",
        f"  {'signal':<17}" + "".join(f"{100 * r:>7.0f}%" for r in rates) + "   Spearman(|error|)",
    ]
    for name, rows in trust["selective_by_signal"].items():
        lines.append(
            f"  {name:<17}"
            + "".join(f"{_fmt(r['pcc']):>8}" for r in rows)
            + f"   {_fmt(trust['error_spearman'][name]):>8}"
        )
    v = trust["review_verdict"]
    lines.append(
        f"review verdict: {100 * v['review_rate']:.1f}% routed, kept PCC {_fmt(v['pcc'])}, RMSE "
        f"{_fmt(v['rmse'])}, within 0.5 {_fmt(None if v['within_0_5'] is None else 100 * v['within_0_5'], '.1f')}%;"
        f" reasons {v['reasons']}"
    )
    return lines


def fairness_rows(
    part: str,
    scored: Sequence[ScoredAnswer],
    human: Sequence[float],
    fields: Sequence[dict],
    speakers: Sequence[str | None] | None,
) -> list[Row]:
    """The rows the fairness tables are made of: each answer's soft score, human score, review verdict, fields,
    candidate (its speaker) and the interval it carried."""
    speakers = list(speakers) if speakers is not None else [None] * len(scored)
    return [
        Row(
            s.score,
            float(h),
            s.review.needed,
            f,
            candidate=sp,
            part=part,
            interval=None if s.interval is None else (s.interval.low, s.interval.high),
        )
        for s, h, f, sp in zip(scored, human, fields, speakers)
    ]


def _split_by_speaker(speakers: Sequence[str | None], seed: int) -> np.ndarray:
    """A random half of the answers, whole speakers at a time (an answer without a speaker is its own)."""
    keys = [sp if sp is not None else f"#{i}" for i, sp in enumerate(speakers)]
    unique = sorted(set(keys))
    chosen = set(np.random.default_rng(seed).permutation(len(unique))[: len(unique) // 2].tolist())
    first = {u for i, u in enumerate(unique) if i in chosen}
    return np.array([k in first for k in keys])


def interval_report(
    scored: Sequence[ScoredAnswer],
    human: Sequence[float],
    ids: Sequence[str] | None,
    speakers: Sequence[str | None],
    levels: Sequence[Level],
    *,
    groups: dict[str, list] | None = None,
    adapter_dir: str | Path | None = None,
    fingerprint: dict[str, str] | None = None,
    method: str = calibration.DEFAULT_METHOD,
    served: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Coverage and mean width of every interval method at 80/90/95 %, overall and per bin, on answers that were
    neither trained nor calibrated on (:mod:`adapters.coverage`).

    With a valid calibration beside the adapter, it is what is measured: every answer it was computed from (same
    audio, or same speaker) is left out. Without one, the answers are split in two halves by speaker (``seed``):
    the first calibrates, the second is measured. Answers of the adapter's training (same audio or speaker, as its
    ``grader_adapter.json`` records them) are always left out. ``ids``: each answer's audio id (None: not checked,
    as for a session whose audio is not at hand and no record to check against). ``served``: also measure the
    intervals the answers carried when they were scored (a session).
    """
    h = np.array(human, float)
    score = np.array([s.score for s in scored], float)
    sd = np.array([s.uncertainty.score_sd for s in scored], float)
    chunks = [len(s.chunks) for s in scored]
    scale = (min(lv.score for lv in levels), max(lv.score for lv in levels))
    state = calibration.load(adapter_dir, fingerprint or {}) if adapter_dir is not None else calibration.UNCALIBRATED
    train_ids, train_speakers = training_record(adapter_dir) if adapter_dir is not None else (set(), set())

    def seen(id_set: set[str], speaker_set: set[str]) -> np.ndarray:
        by_id = np.array([ids is not None and i in id_set for i in (ids or [None] * len(h))])
        return by_id | np.array([sp is not None and sp in speaker_set for sp in speakers])

    trained = seen(train_ids, train_speakers)
    if state.calibration is not None:
        cal = state.calibration
        calibrated = seen(set(cal.answers), set(cal.speakers)) & ~trained
        test = ~trained & ~calibrated
        source, n_cal = f"the stored calibration ({cal.data or 'data not recorded'})", cal.n

        def fitted(m: str, c: float) -> tuple[np.ndarray, np.ndarray]:
            return calibration.intervals_of(cal.rule(m, c), score[test], sd[test], scale)
    else:
        calibrated = _split_by_speaker(speakers, seed) & ~trained
        test = ~trained & ~calibrated
        source, n_cal = (
            f"split half by speaker (seed {seed}): no valid calibration ({state.status})",
            int(calibrated.sum()),
        )
        level_scores = sorted(lv.score for lv in levels)

        def fitted(m: str, c: float) -> tuple[np.ndarray, np.ndarray]:
            rule = calibration.build_rule(m, c, h[calibrated], score[calibrated], sd[calibrated], level_scores, scale)
            return calibration.intervals_of(rule, score[test], sd[test], scale)

    report: dict[str, Any] = {
        "source": source,
        "status": state.status,
        "detail": state.detail,
        "method": method,
        "n_calibration": n_cal,
        "n_test": int(test.sum()),
        "left_out_calibrated": int(calibrated.sum()) if state.calibration is not None else 0,
        "left_out_training": int(trained.sum()),
        "rows": [],
        "served": None,
    }
    sub_groups = {k: [v for v, t in zip(vals, test) if t] for k, vals in (groups or {}).items()}
    if test.sum() >= 2 and n_cal >= 1:
        bins = coverage.bins_of(
            h[test], score[test], sd[test], [c for c, t in zip(chunks, test) if t], levels, sub_groups
        )
        report["rows"] = coverage.method_table(fitted, h[test], bins)
    if served:
        carried = [i for i, s in enumerate(scored) if s.interval is not None]
        report["served_status"] = dict(Counter(s.interval_status for s in scored))
        nominal = {scored[i].interval.coverage for i in carried}
        if carried and len(nominal) == 1:
            sel = np.array(carried)
            low = np.array([scored[i].interval.low for i in carried])
            high = np.array([scored[i].interval.high for i in carried])
            bins = coverage.bins_of(
                h[sel],
                score[sel],
                sd[sel],
                [chunks[i] for i in carried],
                levels,
                {k: [vals[i] for i in carried] for k, vals in (groups or {}).items()},
            )
            report["served"] = {
                "method": scored[carried[0]].interval.method,
                "nominal": nominal.pop(),
                **coverage.coverage_rows(low, high, h[sel], scored[carried[0]].interval.coverage, bins),
            }
    return report


def format_intervals(report: dict[str, Any]) -> list[str]:
    """Human-readable lines of :func:`interval_report`."""
    lines = [
        f"score intervals, calibrated on {report['n_calibration']} answers ({report['source']}), measured on "
        f"{report['n_test']} others ({report['left_out_calibrated']} calibration and {report['left_out_training']} "
        "training answers left out):"
    ]
    if report["rows"]:
        lines += coverage.format_table(report["rows"], detail=(report["method"], 0.9))
    served = report.get("served")
    if report.get("served_status") is not None:
        lines.append(f"intervals the answers carried when scored: {report['served_status']}")
    if served:
        o = served["overall"]
        lines.append(
            f"  {served['method']} at {100 * served['nominal']:.0f}%: coverage {100 * o['coverage']:.1f}% of {o['n']} "
            f"(allowed {100 * o['allowed'][0]:.0f}-{100 * o['allowed'][1]:.0f}%), mean width {o['mean_width']:.3f}, "
            f"{served['bins_outside']} bins outside their range"
        )
    return lines


def answer_sd(s: ScoredAnswer) -> float:
    """The standard error Rudner's method takes for an answer: from its interval (its unclipped width, as a normal's
    central interval at the stated coverage) where it has one, else its score_sd."""
    if s.interval is None:
        return s.uncertainty.score_sd
    width = s.interval.width_unclipped if s.interval.width_unclipped is not None else s.interval.width
    return sd_of_interval(0.0, width, s.interval.coverage)


def overall_sd(overall: Overall) -> float | None:
    """A candidate's standard error from their overall interval (the union bound's is wide, so accuracy reads low;
    a candidate calibration's is read at its nominal coverage)."""
    i = overall.interval
    return None if i is None or i.coverage <= 0 else sd_of_interval(i.low, i.high, i.coverage)


def classification_report(
    part: str,
    scored: Sequence[ScoredAnswer],
    levels: Sequence[Level],
    speakers: Sequence[str | None],
    cuts: Sequence[tuple[str, float]] | None = None,
    candidates: Sequence[Overall] | None = None,
) -> dict[str, Any]:
    """Rudner's classification accuracy and consistency at each cut (:mod:`serve.grading.classification`):

    - ``answers``: every answer of the part, its level by ``cuts`` (default: the midpoints of the part's levels);
    - ``candidates``: each candidate's result on this part alone (their answers averaged, as
      :func:`serve.grading.answers.candidate_result` makes it with a rule of this one part), from ``speakers``;
    - ``exam``: the candidates' overall results over all parts (``candidates``: a session's candidates table, by
      the exam's rule), where given; withheld ones and those without an interval left out.
    """
    cut_table = list(cuts) if cuts is not None else default_cuts(levels)
    out: dict[str, Any] = {
        "cuts": [{"level": c, "cut": x} for c, x in cut_table],
        "answers": rudner([s.score for s in scored], [answer_sd(s) for s in scored], cut_table),
    }
    groups: dict[str, list[ScoredAnswer]] = {}
    for s, who in zip(scored, speakers):
        if who is not None:
            groups.setdefault(who, []).append(s)
    if groups:
        one_part = CandidateConfig(parts={part: {}})
        results = [candidate_result(g, {part: levels}, one_part) for g in groups.values()]
        usable = [(r.score, overall_sd(r)) for r in results if r.score is not None and overall_sd(r) is not None]
        out["candidates"] = rudner([x for x, _ in usable], [sd for _, sd in usable], cut_table)
        out["candidates"]["left_out"] = len(results) - len(usable)
    if candidates is not None:
        usable = [(r.score, overall_sd(r)) for r in candidates if r.score is not None and overall_sd(r) is not None]
        out["exam"] = rudner([x for x, _ in usable], [sd for _, sd in usable], cut_table)
        out["exam"]["left_out"] = len(candidates) - len(usable)
    return out


def format_classification(report: dict[str, Any]) -> list[str]:
    lines = format_rudner(report["answers"], "answers")
    if "candidates" in report:
        lines += format_rudner(report["candidates"], "candidates on this part (answers averaged)")
    if "exam" in report:
        lines += format_rudner(report["exam"], "candidates' overall results (the exam's rule)")
    return lines


def check_signal(selective_signal: str) -> None:
    """``ValueError`` for a selective-scoring signal that does not exist (before any scoring starts)."""
    if selective_signal not in SIGNALS:
        raise ValueError(f"unknown signal {selective_signal!r} (signals: {', '.join(SIGNALS)})")


def evaluate(
    cfg: GraderConfig,
    part: str,
    data: str | Path,
    *,
    adapter: str | Path | None = None,
    plot: str | Path | None = None,
    predictions: str | Path | None = None,
    group_by: Sequence[str] = (),
    report: str | Path | None = None,
    selective_signal: str = "score_sd",
) -> dict[str, Any]:
    """Score ``data`` through vLLM and print the metrics; the last stdout line is their JSON."""
    check_signal(selective_signal)
    cfg = config_for(cfg, part, adapter)
    answers, bad = load_answers(read_jsonl(data, part), cfg.audio)
    for ex, why in bad:
        print(f"not scorable, left out: {ex.audio}: {why}", file=sys.stderr)
    if len(answers) < 2:
        raise ValueError(f"{data}: {len(answers)} usable answers of part {part!r}; at least 2 are needed")
    pcfg = cfg.parts[part]
    ids = answer_ids(answers)
    scored = score_with_engine(cfg, part, answers)
    return report_on(
        part,
        str(data),
        scored,
        [a.example.score for a in answers],
        [a.example.fields for a in answers],
        [str(a.example.audio) for a in answers],
        len(bad),
        pcfg.levels,
        ids=ids,
        speakers=[a.example.speaker for a in answers],
        human_aspects=[a.example.aspects for a in answers],
        adapter_dir=pcfg.adapter,
        fingerprint=fingerprint_of(cfg, part, scored[0].model.adapter_hash),
        method=pcfg.interval.method,
        cuts=cut_table(cfg, part),
        plot=plot or default_plot_path(data, part),
        predictions=predictions,
        group_by=group_by,
        report=report,
        selective_signal=selective_signal,
    )


def fingerprint_of(cfg: GraderConfig, part: str, adapter_hash: str | None) -> dict[str, str]:
    """What the part's scores depend on under ``cfg`` (the key its calibration must match)."""
    return score_fingerprint(cfg.parts[part], adapter_hash, base=cfg.model.base, audio=cfg.audio, engine=cfg.engine)


def human_aspects(fields: dict, where: str) -> dict[str, float]:
    """A human-score row's aspect scores: its ``aspects`` mapping (JSON lines, Parquet) or its ``aspects.<id>``
    columns (CSV)."""
    out = read_aspects(fields.get("aspects"), where)
    for k, v in fields.items():
        if k.startswith("aspects.") and v is not None:
            out |= read_aspects({k.removeprefix("aspects."): v}, where)
    return out


def read_human_scores(path: str | Path, column: str = "score") -> dict[str, tuple[float, dict]]:
    """``response_id`` -> (human score, the row's other fields) from a CSV, JSON-lines or Parquet file."""
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    suffix = Path(path).suffix.lower()
    readers = {
        ".csv": pyarrow.csv.read_csv,
        ".jsonl": pyarrow.json.read_json,
        ".ndjson": pyarrow.json.read_json,
        ".parquet": pyarrow.parquet.read_table,
    }
    if suffix not in readers:
        raise ValueError(f"human scores {path}: unknown format {suffix!r} (use .csv, .jsonl or .parquet)")
    try:
        table = readers[suffix](str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the human scores {path}: {e}") from None
    missing = [c for c in ("response_id", column) if c not in table.column_names]
    if missing:
        raise ValueError(f"human scores {path}: no column {', '.join(missing)} (columns: {table.column_names})")
    out: dict[str, tuple[float, dict]] = {}
    for row in table.to_pylist():
        if row[column] is None:
            continue
        others = {k: v for k, v in row.items() if k not in ("response_id", column)}
        try:
            out[str(row["response_id"])] = (float(row[column]), others)
        except (TypeError, ValueError):
            raise ValueError(f"human scores {path}: {column} {row[column]!r} is not a number") from None
    return out


def session_answer_ids(
    out, rows: Sequence[dict], pcfg, fingerprint: dict[str, str], max_upload_mb: float
) -> list[str] | None:
    """Each session answer's audio id, read where the session read it (relative paths against its manifest's
    folder), when the adapter's training record or its calibration holds answers to tell them from; None when
    there is nothing to compare with. ``ValueError`` when an answer's audio cannot be read: it could be a
    calibration or training answer, so it is not taken for test data."""
    from serve.grading.audio import AudioError
    from serve.session.sources import audio_base, read_audio, resolve_audio

    if pcfg.adapter is None:
        return None
    train_ids, train_speakers = training_record(pcfg.adapter)
    state = calibration.load(pcfg.adapter, fingerprint)
    if not (train_ids or (state.calibration is not None and state.calibration.answers)):
        return None
    manifest = out.session_identity().get("manifest")
    base = audio_base(manifest) if manifest else "."
    ids = []
    for r in rows:
        try:
            ids.append(calibration.audio_id(read_audio(resolve_audio(r["audio"], base), int(max_upload_mb * 2**20))))
        except AudioError as e:
            raise ValueError(
                f"answer {r['response_id']}: its audio cannot be read to tell it from the calibration and training "
                f"answers of {pcfg.adapter}: {e}"
            ) from None
    return ids


def cut_table(cfg: GraderConfig, part: str) -> list[tuple[str, float]]:
    """The exam's cut scores (the config's ``candidate.cuts``), else the midpoints of the part's levels."""
    if cfg.candidate.cuts is not None:
        return [(c.cefr, c.min_score) for c in cfg.candidate.cuts]
    return default_cuts(cfg.parts[part].levels)


def session_candidates(cfg: GraderConfig, rows: Sequence[dict]) -> list[Overall]:
    """Each candidate's overall result from a session's rows of every part, by the exam's rule: what its
    candidates table holds (the parts' scales from ``cfg``)."""
    from serve.session.schema import result_of_row

    groups: dict[str | None, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["candidate_id"], []).append(r)
    levels = {name: p.levels for name, p in cfg.parts.items()}
    intervals = None
    if cfg.candidate.calibration is not None:
        from serve.grading.parts import candidate_intervals_of, config_parts

        intervals = candidate_intervals_of(cfg, config_parts(cfg))
    return [candidate_result([result_of_row(r) for r in g], levels, cfg.candidate, intervals) for g in groups.values()]


def evaluate_session(
    cfg: GraderConfig,
    session: str,
    part: str,
    human_file: str | Path,
    *,
    human_column: str = "score",
    plot: str | Path | None = None,
    predictions: str | Path | None = None,
    group_by: Sequence[str] = (),
    report: str | Path | None = None,
    selective_signal: str = "score_sd",
) -> dict[str, Any]:
    """Evaluate a part's answers as ``l2grader score-session`` scored them (its output folder ``session``) against
    the human scores of ``human_file``, joined by ``response_id``; nothing is scored again. ``cfg``: the config (with
    the registry's version of the part) the session scored with: the part's scale, and its adapter's stored
    calibration, whose methods are measured beside the intervals the answers carried."""
    from serve.session.schema import FAILED, SCORED, answer_of_row
    from serve.session.store import OutputDir

    check_signal(selective_signal)
    human = read_human_scores(human_file, human_column)
    every = OutputDir(session).read_all()
    rows = [r for r in every if r["part"] == part]
    scored_rows = [r for r in rows if r["status"] == SCORED and r["response_id"] in human]
    not_scorable = sum(1 for r in rows if r["status"] not in (SCORED, FAILED))
    failed = sum(1 for r in rows if r["status"] == FAILED)
    if failed:  # the grader's failures, not the answers' audio: said apart
        print(
            f"{failed} answers of part {part!r} failed to be scored in {session} (the grader's failure, not their "
            "audio): left out; run score-session again to retry the retryable ones",
            file=sys.stderr,
        )
    no_human = sum(1 for r in rows if r["status"] == SCORED and r["response_id"] not in human)
    if no_human:
        print(
            f"{no_human} scored answers of part {part!r} have no human score in {human_file}: left out", file=sys.stderr
        )
    if len(scored_rows) < 2:
        raise ValueError(
            f"{session}: {len(scored_rows)} scored answers of part {part!r} with a human score; at least 2 are needed"
        )
    scored = [answer_of_row(r) for r in scored_rows]
    try:
        aspects = [human_aspects(human[r["response_id"]][1], f"{human_file}: {r['response_id']}") for r in scored_rows]
    except DataError as e:
        raise ValueError(str(e)) from None
    pcfg = cfg.parts[part]
    speakers = [r.get("candidate_id") for r in scored_rows]
    adapter_hashes = {s.model.adapter_hash for s in scored}
    fingerprint = fingerprint_of(cfg, part, adapter_hashes.pop() if len(adapter_hashes) == 1 else None)
    ids = session_answer_ids(OutputDir(session), scored_rows, pcfg, fingerprint, cfg.audio.max_upload_mb)
    return report_on(
        part,
        session,
        scored,
        [human[r["response_id"]][0] for r in scored_rows],
        [human[r["response_id"]][1] for r in scored_rows],
        [r["audio"] for r in scored_rows],
        not_scorable,
        pcfg.levels,
        ids=ids,
        speakers=speakers,
        human_aspects=aspects,
        adapter_dir=pcfg.adapter,
        fingerprint=fingerprint,
        method=pcfg.interval.method,
        served=True,
        cuts=cut_table(cfg, part),
        candidates=session_candidates(cfg, every),
        plot=plot or Path(session) / f"{part}.calibration.png",
        predictions=predictions,
        group_by=group_by,
        report=report,
        selective_signal=selective_signal,
    )


def report_on(
    part: str,
    source: str,
    scored: Sequence[ScoredAnswer],
    human: Sequence[float],
    fields: Sequence[dict],
    audio: Sequence[str],
    not_scorable: int,
    levels: Sequence[Level],
    *,
    ids: Sequence[str] | None = None,
    speakers: Sequence[str | None] | None = None,
    human_aspects: Sequence[dict[str, float]] | None = None,
    adapter_dir: str | Path | None = None,
    fingerprint: dict[str, str] | None = None,
    method: str = calibration.DEFAULT_METHOD,
    served: bool = False,
    plot: str | Path,
    predictions: str | Path | None,
    group_by: Sequence[str],
    report: str | Path | None,
    selective_signal: str,
    cuts: Sequence[tuple[str, float]] | None = None,
    candidates: Sequence[Overall] | None = None,
) -> dict[str, Any]:
    """The metrics of scored answers against their human scores, printed (the last stdout line is their JSON),
    with the calibration plot, the predictions file and the HTML report when asked. ``human_aspects``: each
    answer's human aspect scores (aspect -> score; none: the aspects' agreement is not measured)."""
    level_scores = [lv.score for lv in levels]
    result = {
        "soft": all_metrics([s.score for s in scored], human, level_scores),
        "hard": all_metrics([s.hard_score for s in scored], human, level_scores),
    }
    second = [f.get(SECOND_HUMAN) for f in fields]
    baseline = human_baseline([s.score for s in scored], human, [None if x is None else float(x) for x in second])
    human_aspects = list(human_aspects) if human_aspects is not None else [{} for _ in scored]
    aspects = aspect_agreement(
        [{a: (v.score, v.hard_score) for a, v in s.aspects.items()} for s in scored], human_aspects
    )
    unjudged = [a for a in dict.fromkeys(k for s in scored for k in s.aspects) if a not in aspects["aspects"]]
    trust = trust_report(scored, human, selective_signal)
    fairness = fairness_report(fairness_rows(part, scored, human, fields, speakers), group_by, level_scores)
    intervals = interval_report(
        scored,
        human,
        ids,
        list(speakers) if speakers is not None else [None] * len(scored),
        levels,
        groups={g: [f.get(g) for f in fields] for g in group_by},
        adapter_dir=adapter_dir,
        fingerprint=fingerprint,
        method=method,
        served=served,
    )
    classification = classification_report(
        part,
        scored,
        levels,
        list(speakers) if speakers is not None else [None] * len(scored),
        cuts,
        candidates,
    )
    if predictions is not None:
        with open(predictions, "w") as f:
            for a, s, h, fl in zip(audio, scored, human, fields):
                row = {"audio": a, "human": h, **s.model_dump(), **{k: fl.get(k) for k in group_by}}
                f.write(json.dumps(row) + "\n")
    adapter_desc = scored[0].model.adapter or "none (base model)"
    plot_path = calibration_plot(
        plot,
        human,
        [s.score for s in scored],
        [s.hard_score for s in scored],
        f"{'UNTRAINED demo checkpoint: ' if scored[0].model.untrained else ''}{part}: {len(scored)} answers, "
        f"soft PCC {result['soft']['pcc']:.3f}\nadapter: {adapter_desc}",
        level_scores,
    )
    summary = {
        "soft": _finite(result["soft"]),
        "hard": _finite(result["hard"]),
        "human_baseline": None
        if baseline is None
        else {k: _finite(v) if isinstance(v, dict) else v for k, v in baseline.items()},
        "answers": len(scored),
        "not_scorable": not_scorable,
        "untrained": scored[0].model.untrained,
        **trust,
        "fairness": fairness,
        "intervals": intervals,
        "classification": classification,
        "aspects": {
            a: {"n": m["n"], "soft": _finite(m["soft"]), "hard": _finite(m["hard"])}
            for a, m in aspects["aspects"].items()
        },
        "aspect_cross_pcc": {a: _finite(row) for a, row in aspects["cross_pcc"].items()},
    }
    if scored[0].model.untrained:
        print("WARNING: scores of the tiny UNTRAINED demo checkpoint (random weights): they mean nothing")
    print(
        f"{part}: {len(scored)} answers from {source} ({not_scorable} not scorable, left out), adapter {adapter_desc}"
    )
    print(format_metrics("soft", result["soft"]))
    print(format_metrics("hard", result["hard"]))
    for line in format_baseline(baseline):
        print(line)
    for line in format_aspects(aspects):
        print(line)
    if unjudged:
        print(f"aspects scored without human scores in the data (not judged): {', '.join(unjudged)}")
    for line in format_trust(trust):
        print(line)
    for line in format_fairness(fairness):
        print(line)
    for line in format_intervals(intervals):
        print(line)
    for line in format_classification(classification):
        print(line)
    print(f"calibration plot: {plot_path}")
    if report is not None:
        from adapters.report import write_report

        html = write_report(
            report,
            summary,
            human,
            scored,
            level_scores,
            title=f"{part}: {source}, adapter {adapter_desc}",
            calibration_png=plot_path,
        )
        print(f"report: {html}")
    print(json.dumps(summary), flush=True)
    return summary


def check_held_out(
    adapter_dir: str | Path, ids: Sequence[str], speakers: Sequence[str | None], data: str | Path
) -> None:
    """``ValueError`` when any answer of ``data`` was a training answer of the adapter (same audio or speaker)."""
    train_ids, train_speakers = training_record(adapter_dir)
    same = [
        i for i, (a, sp) in enumerate(zip(ids, speakers)) if a in train_ids or (sp is not None and sp in train_speakers)
    ]
    if same:
        raise ValueError(
            f"{data}: {len(same)} of its {len(ids)} answers were the adapter's training answers (the same audio or "
            f"the same speaker; first: answer {same[0] + 1}): held-out answers must be new to the adapter"
        )


def aspect_calibrations(
    cfg: GraderConfig,
    part: str,
    answers: Sequence[Answer],
    scored: Sequence[ScoredAnswer],
    speakers: Sequence[str | None],
) -> dict[str, calibration.AspectCalibration]:
    """Each aspect's records and validation, from the answers that have its human score."""
    from adapters.agreement import aspect_validation
    from serve.grading.parts import aspect_fingerprints, check_part

    pcfg = cfg.parts[part]
    fps = aspect_fingerprints(check_part(part, pcfg, cfg.engine.max_lora_rank), cfg)
    out = {}
    for name, acfg in pcfg.aspects.items():
        have = [i for i, a in enumerate(answers) if name in a.example.aspects and name in scored[i].aspects]
        if len(have) < 2:
            continue
        human = [answers[i].example.aspects[name] for i in have]
        machine = [scored[i].aspects[name] for i in have]
        out[name] = calibration.AspectCalibration(
            fingerprint=fps[name],
            scale=(min(lv.score for lv in acfg.levels), max(lv.score for lv in acfg.levels)),
            level_scores=tuple(sorted(lv.score for lv in acfg.levels)),
            human=human,
            score=[m.score for m in machine],
            score_sd=[m.uncertainty.score_sd for m in machine],
            validation=aspect_validation(
                human, [m.score for m in machine], [scored[i].score for i in have], [speakers[i] for i in have]
            ),
        )
    return out


def calibrate(
    cfg: GraderConfig,
    part: str,
    data: str | Path,
    *,
    adapter: str | Path | None = None,
    allow_small: bool = False,
    report: str | Path | None = None,
    engine=None,
) -> calibration.Calibration:
    """Score held-out ``data`` through vLLM (``engine`` where one serving the part with this adapter is open) and
    store the part's calibration beside its adapter.

    The data must be new to the adapter (checked against its training record: audio and speakers) and not the data
    its intervals are later measured on. Fewer answers than :func:`adapters.coverage.required_answers` at the part's
    coverage are refused unless ``allow_small``; the calibration then records n and the range of coverage it may
    realise. Each method's coverage is measured per bin by 10-fold cross-fitting on the calibration answers.
    """
    cfg = config_for(cfg, part, adapter)
    pcfg = cfg.parts[part]
    if pcfg.adapter is None:
        raise ValueError(f"part {part!r} has no adapter: a calibration is stored beside an adapter")
    nominal = pcfg.interval.coverage
    answers, bad = load_answers(read_jsonl(data, part), cfg.audio)
    for ex, why in bad:
        print(f"not scorable, left out: {ex.audio}: {why}", file=sys.stderr)
    need = coverage.required_answers(nominal)
    lo, hi = coverage.realised_range(max(len(answers), 1), nominal)
    small = None
    if len(answers) < need:
        msg = (
            f"{data}: {len(answers)} usable answers of part {part!r}: a {100 * nominal:.0f}% interval calibrated on "
            f"them realises a coverage between {100 * lo:.1f}% and {100 * hi:.1f}% (5-95 %); {need} answers bring "
            "that within 5 points of nominal"
        )
        if not allow_small:
            raise ValueError(msg + " (--allow-small calibrates on fewer, and records it)")
        print(f"WARNING: {msg}; calibrating anyway (--allow-small)", file=sys.stderr)
        small = calibration.SmallSample(required=need, coverage_range=(lo, hi))
    if len(answers) < 2:
        raise ValueError(f"{data}: {len(answers)} usable answers of part {part!r}; at least 2 are needed")
    ids, speakers = answer_ids(answers), [a.example.speaker for a in answers]
    check_held_out(pcfg.adapter, ids, speakers, data)
    scored = score_with_engine(cfg, part, answers, engine)
    adapter_hash = scored[0].model.adapter_hash
    if adapter_hash != check_adapter(pcfg.adapter).content_hash:
        raise ValueError(f"adapter {pcfg.adapter} changed while it was being calibrated")
    scale = (min(lv.score for lv in pcfg.levels), max(lv.score for lv in pcfg.levels))
    human, scores, sds = (
        [a.example.score for a in answers],
        [s.score for s in scored],
        [s.uncertainty.score_sd for s in scored],
    )
    cal = calibration.fit(
        part,
        fingerprint_of(cfg, part, adapter_hash),
        scale,
        [lv.score for lv in pcfg.levels],
        human,
        scores,
        sds,
        chunks=[len(s.chunks) for s in scored],
        answers=ids,
        speakers=[sp for sp in speakers if sp is not None],
        coverage=nominal,
        small_sample=small,
        aspects=aspect_calibrations(cfg, part, answers, scored, speakers),
        data=str(data),
    )
    path = calibration.write(cal, pcfg.adapter)
    print(f"{part}: calibrated on {cal.n} answers from {data} ({len(bad)} not scorable), adapter {adapter_hash}")
    for name in pcfg.aspects:
        rec = cal.aspects.get(name)
        if rec is None:
            print(f"  aspect {name}: no human {name} scores in the data: no interval, not validated")
            continue
        v = rec.validation
        print(
            f"  aspect {name}: {rec.n} answers; PCC with its own human scores {_fmt(v.pcc_own)}, holistic score's "
            f"{_fmt(v.pcc_holistic)}; added value 95% "
            + ("-" if v.added_value_ci is None else f"[{v.added_value_ci[0]:+.3f}, {v.added_value_ci[1]:+.3f}]")
            + f": {'VALIDATED' if v.validated else 'not validated'} ({v.reason})"
        )
    print(
        f"  realised coverage of a {100 * nominal:.0f}% interval at n={cal.n}: {100 * lo:.1f}-{100 * hi:.1f}% (5-95 %)"
        + (" -- fewer answers than the " + str(need) + " needed for +-5 points" if small else "")
    )
    bins = coverage.bins_of(
        np.asarray(human, float), np.asarray(scores, float), np.asarray(sds, float), cal.chunks, pcfg.levels
    )
    rows = coverage.method_table(coverage.cross_fitted(human, scores, sds, cal.level_scores, scale), human, bins)
    print("coverage by 10-fold cross-fitting on the calibration answers (each judged by a rule fitted on the others):")
    for line in coverage.format_table(rows, detail=(pcfg.interval.method, nominal)):
        print(line)
    at = [r for r in rows if r["nominal"] == nominal] or [r for r in rows if r["nominal"] == 0.9]
    best = min(at, key=lambda r: abs((r["worst_bin"] or {"coverage": r["nominal"]})["coverage"] - r["nominal"]))
    print(f"method with the best worst bin here: {best['method']} (the part serves {pcfg.interval.method})")
    summary = {"part": part, "n": cal.n, "realised_range": [lo, hi], "required": need, "rows": rows}
    if report is not None:
        Path(report).mkdir(parents=True, exist_ok=True)
        (Path(report) / "calibration.json").write_text(json.dumps(summary))
        print(f"report: {Path(report) / 'calibration.json'}")
    print(f"wrote {path}")
    print(json.dumps(summary), flush=True)
    return cal
