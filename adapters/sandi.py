"""The Speak & Improve Corpus 2025 recipe: its release read as it is, adapters per part, the challenge's own output.

The release (16 kHz FLAC from open speaking tests, CEFR A2-C1, train and dev splits) is laid out as::

    reference-materials/flists.flac/{train,dev}-sla-P{1,3,4,5}.tsv   fileID <tab> path to the FLAC (release root)
    reference-materials/flists.flac/{train,dev}-sla-overall.tsv      every response of the complete submissions
    reference-materials/sla-marks/*.tsv                              submission id <tab> mark, per split and part

A submission (``SI114J-00011``) has several responses per part (``SI114J-00011-P10003`` ... ``-P10008`` in
part 1, one each in parts 3 and 4, five in part 5) and one mark per part: 0-6 in half steps (1 = A1 ... 5 =
C1). The overall mark is the mean of the four part marks; incomplete training submissions have none.

How a part's responses are used:

- **Training**: every response is a training answer with its part's mark as its score (as the paper's chunking
  trains every chunk of an answer on the answer's score). A part of five responses gives five answers, each
  with the submission's part mark, and the submission id as ``speaker``, so that held-out sets and the trainer's
  record keep whole submissions apart.
- **Scoring**: each response gets its score (the probability-weighted mean of the label scores, chunks averaged
  as in serving); a submission's part score is **the mean of its responses' scores**, and its overall score the
  mean of its four part scores, written only for submissions with all four parts (as the challenge does).

The marks map onto the config's levels by value: the config (``configs/speak-and-improve-2025.yaml``) keeps the
six CEFR levels A1..C2 scored 1..6, the marks' own scale, so a mark is the score trained on (4.5 is half B2, half
C1 under the fair-average loss) and a predicted score is a mark. Marks below 1 (below A1; the corpus has none
expected) are trained as A1, the loss clipping them to the scale.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters.agreement import kendall, pearson, rmse, spearman, within
from adapters.dataset import DataError

PARTS = ("P1", "P3", "P4", "P5")
OVERALL = "overall"
SPLITS = ("train", "dev")
#: Submissions of train held out to calibrate on (never trained on), by default.
HELD_OUT_SHARE = 0.1
CALIBRATION_SPLIT = "calib"
FLISTS = Path("reference-materials") / "flists.flac"
MARKS = Path("reference-materials") / "sla-marks"
AUDIO_SUFFIXES = (".flac", ".wav")
#: The challenge's figures, in its order: (key, heading, percent?).
METRICS = (
    ("rmse", "RMSE", False),
    ("pcc", "PCC", False),
    ("src", "SRC", False),
    ("krc", "KRC", False),
    ("less05", "LESS05", True),
    ("less1", "LESS1", True),
)
#: Published overall figures (the challenge's evaluation set), printed for reference beside a split's own.
PUBLISHED = (
    ("challenge baseline", {"rmse": 0.444}),
    ("challenge best", {"rmse": 0.364}),
    ("best since", {"rmse": 0.360, "pcc": 0.827}),
)
MARK_RANGE = (0.0, 6.0)


def _token(name: str, token: str) -> bool:
    """Whether ``token`` is a word of the file name (``P1`` in ``dev-sla-P1.tsv`` but not in ``P10``)."""
    return re.search(rf"(?<![a-z0-9]){re.escape(token.lower())}(?![a-z0-9])", name.lower()) is not None


def find_marks(release: str | Path, split: str, part: str) -> Path:
    """The marks file of ``split`` and ``part`` (``P1``..``P5`` or ``overall``) under ``reference-materials/sla-marks``:
    the one ``.tsv`` whose name holds both as words; :class:`DataError` listing the files there when none or several
    match."""
    folder = Path(release) / MARKS
    if not folder.is_dir():
        raise DataError(f"{folder}: no marks folder (a Speak & Improve 2025 release has reference-materials/sla-marks)")
    files = sorted(p for p in folder.rglob("*.tsv") if p.is_file())
    found = [p for p in files if _token(p.name, split) and _token(p.name, part)]
    if len(found) == 1:
        return found[0]
    listed = ", ".join(str(p.relative_to(folder)) for p in files) or "none"
    if not found:
        raise DataError(f"{folder}: no marks file for {split} {part} (a .tsv named with both); found: {listed}")
    names = ", ".join(str(p.relative_to(folder)) for p in found)
    raise DataError(f"{folder}: {len(found)} marks files for {split} {part}, one expected: {names}")


def find_flist(release: str | Path, split: str, part: str) -> Path:
    """``reference-materials/flists.flac/{split}-sla-{part}.tsv``, or the one list there named with both."""
    folder = Path(release) / FLISTS
    exact = folder / f"{split}-sla-{part}.tsv"
    if exact.is_file():
        return exact
    files = sorted(folder.glob("*.tsv")) if folder.is_dir() else []
    found = [p for p in files if _token(p.name, split) and _token(p.name, part)]
    if len(found) == 1:
        return found[0]
    listed = ", ".join(p.name for p in files) or "none"
    raise DataError(f"{exact}: not found ({len(found)} lists named with {split} and {part}; found: {listed})")


def read_marks(path: str | Path) -> dict[str, float]:
    """Submission id -> mark, in the file's order (a header line is skipped); marks must lie in 0-6."""
    path = Path(path)
    out: dict[str, float] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        try:
            if len(fields) < 2:
                raise ValueError("expected: submission id <tab> mark")
            mark = float(fields[1])
        except ValueError as e:
            if n == 1 and len(fields) >= 2:
                continue  # a header
            raise DataError(f"{path}:{n}: {e}") from None
        if not MARK_RANGE[0] <= mark <= MARK_RANGE[1] or math.isnan(mark):
            raise DataError(f"{path}:{n}: mark {fields[1]} outside the corpus's 0-6 scale")
        sub = fields[0].strip()
        if sub in out:
            raise DataError(f"{path}:{n}: submission {sub} marked twice")
        out[sub] = mark
    return out


def submission_of(file_id: str) -> str:
    """``SI114J-00011-P10003`` -> ``SI114J-00011``."""
    sub, sep, _ = file_id.rpartition("-")
    if not sep or not sub:
        raise ValueError(f"response id {file_id!r} is not SUBMISSION-PNNNNN")
    return sub


def part_of(file_id: str) -> str:
    """``SI114J-00011-P10003`` -> ``P1`` (the response suffix's first digit)."""
    suffix = file_id.rpartition("-")[2]
    if len(suffix) < 2 or suffix[0].upper() != "P" or not suffix[1].isdigit():
        raise ValueError(f"response id {file_id!r} has no part suffix P<part><number>")
    return f"P{suffix[1]}"


def audio_path(release: Path, written: str) -> Path | None:
    """The FLAC a file list names (relative to the release root): as written, without a leading ``./``, without a
    leading ``data/`` (or beside the release folder when that folder is ``data/`` itself); None when none exists."""
    p = Path(written)
    if p.is_absolute():
        return p if p.is_file() else None
    rel = written.strip()
    while rel.startswith("./"):
        rel = rel[2:]
    tries = [release / rel]
    if rel.startswith("data/"):
        tries += [release / rel[len("data/") :], release.parent / rel]
    else:
        tries.append(release / "data" / rel)
    return next((t for t in tries if t.is_file()), None)


@dataclass(frozen=True)
class Response:
    """One response of a file list."""

    file_id: str
    submission: str
    part: str
    audio: Path


def read_flist(path: str | Path, release: str | Path, part: str | None = None) -> list[Response]:
    """The responses a file list names, their audio found under ``release``; :class:`DataError` names the list, the
    line and the paths tried for the first missing audio file (and how many are missing)."""
    path, release = Path(path), Path(release)
    out, missing = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise DataError(f"{path}:{n}: expected fileID <tab> path to the FLAC, got {line.strip()[:80]!r}")
        file_id, written = fields[0].strip(), fields[1].strip()
        if n == 1 and not written.lower().endswith(AUDIO_SUFFIXES):
            continue  # a header
        try:
            sub, resp_part = submission_of(file_id), part_of(file_id)
        except ValueError as e:
            raise DataError(f"{path}:{n}: {e}") from None
        if part is not None and resp_part != part:
            raise DataError(f"{path}:{n}: response {file_id} is of part {resp_part}, the list of part {part}")
        found = audio_path(release, written)
        if found is None:
            missing.append((n, written))
            continue
        out.append(Response(file_id, sub, resp_part, found.resolve()))
    if missing:
        n, written = missing[0]
        raise DataError(
            f"{path}:{n}: audio file {written} not found under {release} (nor without a leading ./ or data/); "
            f"{len(missing)} of the list's files are missing"
        )
    return out


def held_out_submissions(submissions: Iterable[str], share: float = HELD_OUT_SHARE, seed: int = 0) -> set[str]:
    """A ``share`` of the submissions (at least one when there are two or more), drawn by ``seed``."""
    unique = sorted(set(submissions))
    if share <= 0 or len(unique) < 2:
        return set()
    n = min(len(unique) - 1, max(1, round(share * len(unique))))
    order = np.random.default_rng(seed).permutation(len(unique))[:n]
    return {unique[i] for i in order.tolist()}


def data_file(prepared: str | Path, split: str, part: str) -> Path:
    """The JSON-lines answers ``prepare`` writes for a split and part: ``PREPARED/{split}.{part}.jsonl``."""
    return Path(prepared) / f"{split}.{part}.jsonl"


def marks_copy(prepared: str | Path, split: str, part: str) -> Path:
    """The copy of a marks file ``prepare`` keeps (its order is the order predictions are written in)."""
    return Path(prepared) / "marks" / f"{split}-{part}.tsv"


def write_tsv(path: Path, scores: Mapping[str, float]) -> Path:
    """``id <tab> score`` with three decimals, one line each, in the mapping's order (the challenge's format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}\t{v:.3f}\n" for k, v in scores.items()))
    return path


def prepare(
    release: str | Path,
    out: str | Path,
    *,
    splits: Sequence[str] = SPLITS,
    held_out: float = HELD_OUT_SHARE,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the project's answer files from the release: ``OUT/{split}.{part}.jsonl`` for each split and part,
    ``OUT/calib.{part}.jsonl`` (the ``held_out`` share of train's submissions, by submission, the same for every
    part), copies of the marks in ``OUT/marks/`` and ``OUT/prepare.json`` (counts, the complete submissions of the
    overall file list among them). Each row: the response's audio,
    its submission's part mark as ``score``, ``part``, ``speaker`` (the submission), ``response`` (the file id).
    Responses of a submission without a mark for the part are left out (counted)."""
    release, out = Path(release), Path(out)
    if not release.is_dir():
        raise DataError(f"{release}: no such folder (the release root, holding reference-materials/)")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"release": str(release.resolve()), "held_out_share": held_out, "seed": seed}
    calib: set[str] = set()
    for split in splits:
        rows: dict[str, list[tuple[Response, float]]] = {}
        unmarked: dict[str, int] = {}
        part_marks: dict[str, dict[str, float]] = {}
        for part in PARTS:
            marks = part_marks[part] = read_marks(find_marks(release, split, part))
            write_tsv(marks_copy(out, split, part), marks)
            responses = read_flist(find_flist(release, split, part), release, part)
            rows[part] = [(r, marks[r.submission]) for r in responses if r.submission in marks]
            unmarked[part] = sum(1 for r in responses if r.submission not in marks)
        overall = read_marks(find_marks(release, split, OVERALL))
        write_tsv(marks_copy(out, split, OVERALL), overall)
        if split == "train":
            calib = held_out_submissions({r.submission for part in PARTS for r, _ in rows[part]}, held_out, seed)
            for part, marks in (*part_marks.items(), (OVERALL, overall)):  # the held-out ones, in the files' order
                write_tsv(marks_copy(out, CALIBRATION_SPLIT, part), {s: m for s, m in marks.items() if s in calib})
        for part in PARTS:
            groups = {split: [x for x in rows[part] if x[0].submission not in calib]}
            if split == "train":
                groups[CALIBRATION_SPLIT] = [x for x in rows[part] if x[0].submission in calib]
            for name, items in groups.items():
                with open(data_file(out, name, part), "w") as f:
                    for r, mark in items:
                        row = {"audio": str(r.audio), "score": mark, "part": part, "speaker": r.submission}
                        f.write(json.dumps({**row, "response": r.file_id}) + "\n")
                summary.setdefault(name, {})[part] = {
                    "responses": len(items),
                    "submissions": len({r.submission for r, _ in items}),
                }
            summary[split][part]["unmarked_responses"] = unmarked[part]
        summary[split]["overall_marks"] = len(overall)
        complete = {r.submission for r in read_flist(find_flist(release, split, OVERALL), release)}
        summary[split]["complete_submissions"] = len(complete)
        unlisted = [s for s in overall if s not in complete]
        if unlisted:
            print(
                f"{split}: {len(unlisted)} submissions with an overall mark are not in the overall file list (first "
                f"{unlisted[0]})",
                file=sys.stderr,
            )
    (out / "prepare.json").write_text(json.dumps(summary, indent=1))
    return summary


def submission_scores(
    scores: Iterable[tuple[str, float]],
) -> dict[str, float]:
    """Each submission's part score: the mean of its responses' scores (``(submission, score)`` pairs)."""
    acc: dict[str, list[float]] = {}
    for sub, s in scores:
        acc.setdefault(sub, []).append(float(s))
    return {sub: float(np.mean(v)) for sub, v in acc.items()}


def overall_scores(parts: Mapping[str, Mapping[str, float]], order: Sequence[str] | None = None) -> dict[str, float]:
    """The mean of the four part scores, for the submissions scored in every part (in ``order``, when given: the
    overall marks file's; its submissions without all four parts are left out, as the challenge does)."""
    complete = set.intersection(*(set(parts.get(p, {})) for p in PARTS))
    if order is None:
        first = parts.get(PARTS[0], {})
        order = [s for s in first if s in complete]
    return {s: float(np.mean([parts[p][s] for p in PARTS])) for s in order if s in complete}


def in_marks_order(scores: Mapping[str, float], marks: Mapping[str, float], part: str) -> dict[str, float]:
    """The part's scores in the marks file's order; a marked submission without a score (no scorable response)
    gets the mean of the others (said on stderr), as the challenge's scorer needs every id."""
    fill = float(np.mean(list(scores.values()))) if scores else float(np.mean(list(marks.values())))
    lost = [s for s in marks if s not in scores]
    if lost:
        print(
            f"{part}: {len(lost)} marked submissions have no scored response (first {lost[0]}): given the part's mean "
            f"prediction {fill:.3f}",
            file=sys.stderr,
        )
    return {s: scores.get(s, fill) for s in marks}


def metrics(pred: Mapping[str, float], marks: Mapping[str, float]) -> dict[str, float] | None:
    """The challenge's six figures for the submissions both have (None when fewer than two)."""
    ids = [s for s in marks if s in pred]
    if len(ids) < 2:
        return None
    p, h = [pred[s] for s in ids], [marks[s] for s in ids]
    return {
        "n": len(ids),
        "rmse": rmse(p, h),
        "pcc": pearson(p, h),
        "src": spearman(p, h),
        "krc": kendall(p, h),
        "less05": 100 * within(p, h, 0.5),
        "less1": 100 * within(p, h, 1.0),
    }


def _cell(m: Mapping[str, float] | None, key: str, percent: bool) -> str:
    v = None if m is None else m.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>8}"
    return f"{v:>7.1f}%" if percent else f"{v:>8.3f}"


def format_table(results: Mapping[str, Mapping[str, float] | None], title: str = "") -> list[str]:
    """The challenge's table: a row per part and the overall, then the published overall figures for reference."""
    head = f"{'':<22}{'n':>6}" + "".join(f"{h:>8}" for _, h, _ in METRICS)
    lines = [title] if title else []
    lines.append(head)
    for name, m in results.items():
        n = "-" if m is None else str(m["n"])
        lines.append(f"{name:<22}{n:>6}" + "".join(_cell(m, k, pct) for k, _, pct in METRICS))
    lines.append("published overall figures, for reference (the challenge's evaluation set, not this split):")
    for name, m in PUBLISHED:
        lines.append(f"  {name:<20}{'':>6}" + "".join(_cell(m, k, pct) for k, _, pct in METRICS))
    return lines


def read_predictions(path: str | Path) -> dict[str, float]:
    """A predictions file in the challenge's format (``id <tab> score``)."""
    return read_marks(path) if Path(path).is_file() else {}


def prediction_file(out: str | Path, split: str, part: str) -> Path:
    """Where predictions of a split and part (or ``overall``) go: ``OUT/{split}-{part}.tsv``."""
    return Path(out) / f"{split}-{part}.tsv"


def score_files(predictions: str | Path, prepared: str | Path, split: str = "dev") -> dict[str, Any]:
    """The challenge's figures of the prediction files in ``predictions`` against the marks ``prepare`` kept."""
    results: dict[str, Any] = {}
    for part in (*PARTS, OVERALL):
        marks_path = marks_copy(prepared, split, part)
        if not marks_path.is_file():
            raise DataError(f"{marks_path}: no marks for {split} {part} (run `l2grader sandi prepare` first)")
        pred_path = prediction_file(predictions, split, part)
        if not pred_path.is_file():
            raise DataError(f"{pred_path}: no predictions for {split} {part}")
        results[part] = metrics(read_marks(pred_path), read_marks(marks_path))
    return results


#: Below this many submissions a row's figures are too uncertain to read (at 30, the 95 % interval of a correlation of
#: 0.5 is 0.17-0.73).
FEW_SUBMISSIONS = 30


def report(results: Mapping[str, Any], split: str, untrained: bool = False) -> None:
    """Print the table and, last, its JSON."""
    if untrained:
        print("WARNING: scores of the tiny UNTRAINED demo checkpoint (random weights): they mean nothing")
    for line in format_table(results, f"Speak & Improve 2025, {split}: predictions against the marks"):
        print(line)
    few = sorted(k for k, m in results.items() if m is not None and m["n"] < FEW_SUBMISSIONS)
    if few:
        print(
            f"WARNING: fewer than {FEW_SUBMISSIONS} submissions in {', '.join(few)}: their figures are too uncertain "
            "to compare with each other or with the published ones"
        )
    clean = {
        k: None if m is None else {x: (None if isinstance(y, float) and math.isnan(y) else y) for x, y in m.items()}
        for k, m in results.items()
    }
    print(json.dumps({"split": split, "metrics": clean}), flush=True)


#: The marks' scale: the score each CEFR level must have in a part's levels.
MARK_SCALE = {"A1": 1.0, "A2": 2.0, "B1": 3.0, "B2": 4.0, "C1": 5.0}


def check_scale(part: str, levels: Sequence[Any]) -> None:
    """``ValueError`` unless the part's levels score A1..C1 as the marks do (1..5): then a mark is a score."""
    found = {lv.cefr: lv.score for lv in levels}
    wrong = {c: found.get(c) for c, s in MARK_SCALE.items() if found.get(c) != s}
    if wrong:
        raise ValueError(
            f"part {part}: its levels must score A1..C1 as the corpus's marks do, 1..5 (the default levels do); "
            f"found {', '.join(f'{c}={v}' for c, v in wrong.items())}"
        )


def adapters_for(cfg, adapters: Mapping[str, str | Path]):
    """The config with only the recipe's parts, each with its adapter from ``adapters`` where given (the engine's
    rank raised as :func:`adapters.evaluate.config_for` does)."""
    from adapters.evaluate import config_for

    parts, engine = {}, cfg.engine
    for part in PARTS:
        check_scale(part, cfg.part(part).levels)
        one = config_for(cfg, part, adapters.get(part))
        parts[part] = one.parts[part]
        if one.engine.max_lora_rank > engine.max_lora_rank:
            engine = one.engine
    return cfg.model_copy(update={"parts": parts, "engine": engine})


def predict(
    cfg,
    prepared: str | Path,
    out: str | Path,
    *,
    split: str = "dev",
    adapters: Mapping[str, str | Path] | None = None,
    engine=None,
) -> dict[str, Any]:
    """Score every response of ``split`` (one engine, all parts in one batch: ``engine`` when one serving the four
    parts is open), combine them per submission (mean of the responses per part, mean of the four parts overall),
    write the challenge's files ``OUT/{split}-{part}.tsv`` in each marks file's order and print the challenge's
    table against the marks."""
    from adapters.dataset import load_answers, read_jsonl
    from serve.engine.offline import OfflineEngine
    from serve.grading.audio import PreparedAnswer

    cfg = adapters_for(cfg, adapters or {})
    batch, owners = [], []
    for part in PARTS:
        path = data_file(prepared, split, part)
        answers, bad = load_answers(read_jsonl(path, part), cfg.audio)
        for ex, why in bad:
            print(f"not scorable, left out: {ex.audio}: {why}", file=sys.stderr)
        batch += [(part, PreparedAnswer(list(a.chunks), a.quality)) for a in answers]
        owners += [(part, a.example.speaker) for a in answers]
    if not batch:
        raise DataError(f"{prepared}: no scorable responses of {split}")
    if engine is not None:
        scored = engine.score_answers(batch)
    else:
        scorer = OfflineEngine(cfg)  # as adapters.evaluate.score_with_engine, with the answers of every part at once
        try:
            scored = scorer.score_answers(batch)
        finally:
            scorer.shutdown()
    per_part = {
        part: submission_scores((sub, s.score) for (p, sub), s in zip(owners, scored) if p == part) for part in PARTS
    }
    marks = {part: read_marks(marks_copy(prepared, split, part)) for part in (*PARTS, OVERALL)}
    written = {part: in_marks_order(per_part[part], marks[part], part) for part in PARTS}
    overall_order = list(marks[OVERALL]) or None
    written[OVERALL] = overall_scores(written, overall_order)
    for part, scores in written.items():
        write_tsv(prediction_file(out, split, part), scores)
    results = {part: metrics(written[part], marks[part]) for part in (*PARTS, OVERALL)}
    print(f"wrote {', '.join(str(prediction_file(out, split, p)) for p in (*PARTS, OVERALL))}", file=sys.stderr)
    report(results, split, untrained=cfg.model.untrained)
    return results


def run(
    cfg,
    release: str | Path,
    out: str | Path,
    *,
    train_options: Mapping[str, Any] | None = None,
    calibrate: bool = True,
    allow_small: bool = False,
    held_out: float = HELD_OUT_SHARE,
    seed: int = 0,
) -> dict[str, Any]:
    """The whole recipe: ``prepare`` into ``OUT/data``, ``train`` an adapter per part into ``OUT/adapters/PART``
    (on the part's train answers, the held-out submissions left out), ``calibrate`` each on the held-out
    submissions (a part that cannot be, e.g. too few of them without ``allow_small``, is left uncalibrated with a
    warning: the predictions do not use intervals), then ``predict`` dev into ``OUT/predictions``.
    ``train_options``: :class:`adapters.train.TrainOptions` fields (epochs, lr, batch_size, ...)."""
    from adapters.evaluate import calibrate as calibrate_part
    from adapters.train import TrainOptions, format_summary, train

    for part in PARTS:
        check_scale(part, cfg.part(part).levels)
    out = Path(out)
    data = out / "data"
    prepare(release, data, held_out=held_out, seed=seed)
    adapters = {part: out / "adapters" / part for part in PARTS}
    for part in PARTS:
        print(f"== {part}: training on {data_file(data, 'train', part)}", file=sys.stderr)
        opts = TrainOptions(
            part=part,
            data=str(data_file(data, "train", part)),
            out=str(adapters[part]),
            seed=seed,
            **dict(train_options or {}),
        )
        print(format_summary(train(cfg, opts)), file=sys.stderr)
    from serve.engine.offline import OfflineEngine

    engine = OfflineEngine(adapters_for(cfg, adapters))  # one engine start for the calibrations and the predictions
    try:
        if calibrate:
            for part in PARTS:
                print(f"== {part}: calibrating on {data_file(data, CALIBRATION_SPLIT, part)}", file=sys.stderr)
                try:
                    with contextlib.redirect_stdout(sys.stderr):  # stdout: the dev table, its JSON the last line
                        calibrate_part(
                            cfg,
                            part,
                            data_file(data, CALIBRATION_SPLIT, part),
                            adapter=adapters[part],
                            allow_small=allow_small,
                            engine=engine,
                        )
                except ValueError as e:  # the predictions do not need it: say so, and go on
                    print(f"WARNING: {part} not calibrated (its answers carry no interval): {e}", file=sys.stderr)
        return predict(cfg, data, out / "predictions", split="dev", adapters=adapters, engine=engine)
    finally:
        engine.shutdown()
