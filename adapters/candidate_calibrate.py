"""``l2grader calibrate-candidates``: fit the candidate-level calibration of the overall interval.

Held-out candidates' machine overall scores (a finished session's answers, combined by the config's ``candidate:``
rule exactly as its candidates table is; or any table of candidates' overall scores) are joined by
``candidate_id`` with their human overall scores, and :mod:`serve.grading.candidate_calibration` keeps them with the
fingerprint of the rule and of every counted part. The coverage each method realises is measured by 10-fold
cross-fitting, overall and per bin, beside the parts' union bound on the same candidates where a session gives it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapters import coverage
from serve.grading import candidate_calibration
from serve.grading.adapter_files import training_record
from serve.grading.answers import candidate_result
from serve.grading.config import GraderConfig
from serve.grading.parts import Part, part_fingerprint

_READERS = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")


def read_table(path: str | Path, id_column: str, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a CSV, TSV, JSON-lines or Parquet file with ``id_column`` (read as text: ``007`` stays ``007``)."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    suffix = Path(path).suffix.lower()
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a folder, not a table of candidates' scores")
    if not Path(path).exists():
        raise ValueError(f"{path}: no such file")
    try:
        if suffix in (".csv", ".tsv"):
            table = pyarrow.csv.read_csv(
                str(path),
                parse_options=pyarrow.csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
                # only an empty field is missing: "nan" or "NA" in a score column is a bad score, not a blank one
                convert_options=pyarrow.csv.ConvertOptions(
                    column_types={id_column: pa.string()}, null_values=[""], strings_can_be_null=True
                ),
            )
        elif suffix in (".jsonl", ".ndjson"):
            table = pyarrow.json.read_json(str(path))
        elif suffix == ".parquet":
            table = pyarrow.parquet.read_table(str(path))
        else:
            raise ValueError(f"{path}: unknown format {suffix!r} (use {', '.join(_READERS)})")
    except (OSError, pa.ArrowInvalid) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    missing = [c for c in (id_column, *columns) if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)} (columns: {table.column_names})")
    return table.select([id_column, *columns]).to_pylist()


def read_scores(
    path: str | Path, id_column: str = "candidate_id", column: str = "score", scale: tuple[float, float] | None = None
) -> tuple[dict[str, float], set[str]]:
    """``candidate_id`` -> score, and the ids whose score is empty (no score: left out, and counted). A row without
    an id, a duplicate id, a non-number, NaN or infinity, or (given ``scale``) a score off the scale is an error."""
    out: dict[str, float] = {}
    empty: set[str] = set()
    for n, row in enumerate(read_table(path, id_column, (column,)), start=1):
        cid, value = row[id_column], row[column]
        if cid is None or str(cid).strip() == "":
            raise ValueError(f"{path}: row {n} has no {id_column}")
        cid = str(cid)
        if cid in out or cid in empty:
            raise ValueError(f"{path}: candidate {cid!r} appears twice")
        if value is None or (isinstance(value, str) and not value.strip()):
            empty.add(cid)
            continue
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: {column} {value!r} of candidate {cid!r} is not a number") from None
        if not np.isfinite(score):
            raise ValueError(f"{path}: {column} of candidate {cid!r} is {score} (not a finite number)")
        if scale is not None and not scale[0] <= score <= scale[1]:
            raise ValueError(
                f"{path}: {column} {score:g} of candidate {cid!r} is off the exam's scale {scale[0]:g}-{scale[1]:g}"
            )
        out[cid] = score
    return out, empty


def session_overall(cfg: GraderConfig, session: str, parts: Mapping[str, Part]) -> dict[str, Any]:
    """Each candidate's overall result from a session's answers by the config's rule (the parts' union bound as the
    interval); ``ValueError`` when the session scored a part with another adapter than the one served now."""
    from serve.session.schema import SCORED, result_of_row
    from serve.session.store import OutputDir

    if not Path(session).is_dir():
        hint = " (a candidates table goes with --candidates)" if Path(session).is_file() else ""
        raise ValueError(f"{session}: no such folder: give a score-session output folder{hint}")
    rows = OutputDir(session).read_all()
    if not rows:
        raise ValueError(f"{session}: no answers (is it a score-session output folder?)")
    for r in rows:
        if r["status"] != SCORED or r["part"] not in parts:
            continue
        got, want = (r.get("model") or {}).get("adapter_hash"), parts[r["part"]].adapter_hash
        if got != want:
            raise ValueError(
                f"{session}: answer {r['response_id']} of part {r['part']} was scored by adapter {got}, the part "
                f"serves {want}: its candidates' scores are not what is served now"
            )
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["candidate_id"] is not None:
            groups.setdefault(str(r["candidate_id"]), []).append(r)
    levels = {name: p.config.levels for name, p in parts.items()}
    return {cid: candidate_result([result_of_row(r) for r in g], levels, cfg.candidate) for cid, g in groups.items()}


def check_held_out(parts: Mapping[str, Part], scope: list[str], candidates: list[str]) -> None:
    """``ValueError`` when a calibration candidate was a training speaker of a counted part's adapter."""
    for name in scope:
        part = parts.get(name)
        if part is None or part.adapter is None:
            continue
        _, speakers = training_record(part.adapter.path)
        same = sorted(set(candidates) & speakers)
        if same:
            raise ValueError(
                f"{len(same)} calibration candidates were training speakers of part {name}'s adapter (first: "
                f"{same[0]}): the candidates must be held out from training"
            )


def calibrate_candidates(
    cfg: GraderConfig,
    parts: Mapping[str, Part],
    human_file: str | Path,
    *,
    session: str | None = None,
    candidates_file: str | Path | None = None,
    id_column: str = "candidate_id",
    human_column: str = "score",
    out: str | Path | None = None,
    allow_small: bool = False,
    report: str | Path | None = None,
) -> candidate_calibration.CandidateCalibration:
    """Fit and write the candidate calibration (see the module); ``parts``: the registered parts, as served."""
    if (session is None) == (candidates_file is None):
        raise ValueError("give one of --session or --candidates")
    c = cfg.candidate.calibration
    path = Path(out) if out is not None else (c.path if c is not None else None)
    if path is None:
        raise ValueError("no file to write: name it in the config (candidate.calibration.path) or with --out")
    nominal = c.coverage if c is not None else 0.9
    method = c.method if c is not None else candidate_calibration.DEFAULT_METHOD
    rule = cfg.candidate
    scope = list(rule.parts) if rule.parts else sorted(parts)
    unknown = [p for p in scope if p not in parts]
    if unknown:
        raise ValueError(f"the rule's parts {unknown} are not registered: nothing to fingerprint them by")
    levels = parts[scope[0]].config.levels
    scale = (min(lv.score for lv in levels), max(lv.score for lv in levels))

    human, unrated = read_scores(human_file, id_column, human_column, scale)
    union: dict[str, Any] = {}
    if session is not None:
        results = session_overall(cfg, session, parts)
        machine = {cid: o.score for cid, o in results.items() if o.score is not None}
        union = {cid: o.interval for cid, o in results.items() if o.interval is not None}
        answers = {cid: o.scored for cid, o in results.items()}
        withheld = set(results) - set(machine)
        source = str(session)
    else:
        machine, withheld = read_scores(candidates_file, id_column, "score", scale)
        answers = {}
        source = str(candidates_file)
        print(
            f"WARNING: {candidates_file}: its scores are taken to be this exam's overall scores under the adapters "
            "serving now, which a table cannot show (a session's answers name their adapters: --session checks "
            "them)",
            file=sys.stderr,
        )
    ids = sorted(set(machine) & set(human))
    print(
        f"{len(ids)} candidates with a machine and a human overall score; left out: {len(withheld)} withheld, "
        f"{len(set(machine) - set(human) - unrated)} without a human score, {len(unrated)} with an empty human score, "
        f"{len(set(human) - set(machine) - withheld)} human scores without a machine one",
        file=sys.stderr,
    )
    if len(ids) >= 2 and all(human[i] == machine[i] for i in ids):
        raise ValueError(
            f"the machine scores ({source}) and the human scores ({human_file}) are the same for every candidate: "
            "the same file twice?"
        )
    if len(ids) < 2:
        raise ValueError(f"{len(ids)} candidates to calibrate on; at least 2 are needed")
    check_held_out(parts, scope, ids)
    need = coverage.required_answers(nominal)
    lo, hi = coverage.realised_range(len(ids), nominal)
    small = None
    if len(ids) < need:
        msg = (
            f"{len(ids)} candidates: a {100 * nominal:.0f}% overall interval calibrated on them realises a coverage "
            f"between {100 * lo:.1f}% and {100 * hi:.1f}% (5-95 %); {need} bring that within 5 points of nominal"
        )
        if not allow_small:
            raise ValueError(msg + " (--allow-small calibrates on fewer, and records it)")
        print(f"WARNING: {msg}; calibrating anyway (--allow-small)", file=sys.stderr)
        small = candidate_calibration.SmallSample(required=need, coverage_range=(lo, hi))
    h = np.array([human[i] for i in ids])
    s = np.array([machine[i] for i in ids])
    fp = candidate_calibration.fingerprint(rule, {name: part_fingerprint(p, cfg) for name, p in parts.items()})
    cal = candidate_calibration.fit(
        fp,
        scale,
        [lv.score for lv in levels],
        h,
        s,
        candidates=ids,
        coverage=nominal,
        small_sample=small,
        data=source,
        human_data=str(human_file),
    )
    written = candidate_calibration.write(cal, path)
    print(f"candidates: calibrated on {cal.n} candidates ({source}, human scores {human_file})")
    print(
        f"  realised coverage of a {100 * nominal:.0f}% interval at n={cal.n}: {100 * lo:.1f}-{100 * hi:.1f}% (5-95 %)"
    )
    rows = method_rows(h, s, cal.level_scores, scale, levels, [answers.get(i) for i in ids])
    print(
        "coverage by 10-fold cross-fitting on the calibration candidates (each judged by a rule fitted on the others):"
    )
    for line in coverage.format_table(rows, detail=(method, nominal)):
        print(line)
    summary: dict[str, Any] = {"n": cal.n, "realised_range": [lo, hi], "required": need, "rows": rows}
    with_union = [i for i in ids if i in union]
    if with_union:
        ul = np.array([union[i].low for i in with_union])
        uh = np.array([union[i].high for i in with_union])
        hu = np.array([human[i] for i in with_union])
        covered = float(np.mean((hu >= ul - 1e-9) & (hu <= uh + 1e-9)))
        stated = float(np.mean([union[i].coverage for i in with_union]))
        summary["union_bound"] = {
            "n": len(with_union),
            "stated_coverage": stated,
            "coverage": covered,
            "mean_width": float(np.mean(uh - ul)),
        }
        print(
            f"  the parts' union bound on the same {len(with_union)} candidates: stated {100 * stated:.1f}%, realised "
            f"{100 * covered:.1f}%, mean width {float(np.mean(uh - ul)):.3f}"
        )
    if report is not None:
        Path(report).mkdir(parents=True, exist_ok=True)
        (Path(report) / "candidate_calibration.json").write_text(json.dumps(summary))
        print(f"report: {Path(report) / 'candidate_calibration.json'}")
    print(f"wrote {written} (served with method {method} at {100 * nominal:.0f}%)")
    print(json.dumps(summary), flush=True)
    return cal


def method_rows(human, score, level_scores, scale, levels, answers) -> list[dict]:
    """Each candidate method at each reported coverage, cross-fitted, overall and per bin: predicted and human
    level, position between levels, and (from a session) the candidate's scored answers."""
    h, s = np.asarray(human, float), np.asarray(score, float)
    zeros = np.zeros(len(h))
    bins = coverage.bins_of(h, s, zeros, None, levels)
    del bins["score_sd"]  # the candidate methods have no spread to bin by
    if all(a is not None for a in answers):
        bins["answers"] = [str(a) if a < 6 else "6+" for a in answers]
    fitted = coverage.cross_fitted(h, s, zeros, level_scores, scale)
    return coverage.method_table(fitted, h, bins, methods=candidate_calibration.METHODS)
