"""``l2grader score-session``: the driver of a session run.

Reads and checks the manifest (columns, ids, part names) and the output
folder before Ray starts, so that a refusal takes seconds and leaves nothing
behind; skips the answers the output folder already holds (a finished session
starts neither Ray nor an engine); starts Ray locally (or joins ``--address``),
streams the rest through :mod:`serve.session.stages` and commits the results
in parts as they come, then writes the candidates table and prints the summary
(its last line one JSON object).
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from serve.grading.candidate_calibration import CandidateIntervals
from serve.grading.config import CandidateConfig, GraderConfig
from serve.grading.parts import Part, candidate_intervals_of
from serve.runtime.console import log
from serve.session.schema import ANSWER_SCHEMA, FAILED, SCORED
from serve.session.sources import audio_base, check_parts, load_manifest
from serve.session.stages import SCORING_FROM, SCORING_TO, Scorer, prepare
from serve.session.store import OutputDir, ids_digest


@dataclass
class SessionOptions:
    manifest: str
    out: str
    address: str | None = None
    engines: int = 1  # engine actors (the command's default: the service's scorer max_replicas)
    engine_cpus: float = 1.0  # each engine actor's CPUs and GPUs (the command's: a scorer replica's)
    engine_gpus: float = 0.0
    batch_size: int = 64  # answers per engine call
    rows_per_part: int = 1024  # answers per committed output part (at most)
    part_wait_s: float = 30.0  # a part is committed at least this often while results come
    progress_s: float = 10.0
    verbose: bool = False  # Ray's and the engines' logs on this terminal too (else in the Ray log folder only)
    decode: str = "auto"  # "tasks": CPU tasks of their own; "engines": in the engine actors; auto: tasks with --address
    object_store_mb: int = (
        1024  # local Ray only: the object store, which bounds the decoded audio waiting for an engine
    )


def decode_in_tasks(opts: SessionOptions) -> bool:
    """Decode in CPU tasks of their own (on a cluster: spread over its CPU nodes), or in the engine actors.

    On one machine the tasks only compete with the engine for the same cores:
    on 2 cores, 1,000 answers of 8-20 s, the session ran at 0.79x the offline
    path's answers/s with decoding in tasks and 0.99x with it in the engine actor.
    """
    return opts.decode == "tasks" or (opts.decode == "auto" and bool(opts.address))


def pipeline(ds, cfg: GraderConfig, parts: Mapping[str, Part], opts: SessionOptions):
    """The Ray Data pipeline from manifest rows to answer rows."""
    import ray.data  # the driver loads Ray only once the checks passed and there is work

    # Ray Data fuses a task stage into the next actor stage when their remote arguments are equal (then the engine
    # actors decode each batch before scoring it); a task-only argument (retries on a lost node) keeps them apart.
    own_tasks = {"max_retries": 3} if decode_in_tasks(opts) else {"num_gpus": opts.engine_gpus or None}
    return (
        ds.repartition(target_num_rows_per_block=opts.batch_size)
        .map_batches(
            prepare,
            fn_kwargs={"cfg": cfg, "base": audio_base(opts.manifest), "parts": parts},
            batch_format="pyarrow",
            batch_size=opts.batch_size,
            num_cpus=opts.engine_cpus if not decode_in_tasks(opts) else 1,
            **own_tasks,
        )
        .map_batches(
            Scorer,
            fn_constructor_kwargs={"cfg": cfg, "parts": parts},
            compute=ray.data.ActorPoolStrategy(size=opts.engines),
            batch_format="pyarrow",
            batch_size=opts.batch_size,
            num_cpus=opts.engine_cpus,
            num_gpus=opts.engine_gpus or None,
        )
    )


class Progress:
    """A progress line on stderr every few seconds, and the run's timings.

    Throughput and the time to go are measured over the scoring itself: from
    when the engines began their first batch to when they ended their last
    (the times the engine stage stamps on its rows), not from the start of
    the run (Ray's and the engines' start-up) nor between the arrivals of
    results in the driver, which come in bursts.
    """

    def __init__(self, todo: int, every_s: float):
        self.todo, self.every_s = todo, every_s
        self.start = self.last_print = time.monotonic()
        self.scoring_from: float | None = None  # seconds since the epoch, as the engine stage stamps them
        self.scoring_to: float | None = None
        self.rows = self.scored = 0
        self.audio_s = 0.0
        self.errors: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    def add(self, table) -> None:
        now = time.monotonic()
        self.rows += table.num_rows
        if table.num_rows and SCORING_FROM in table.column_names:
            began, ended = pc.min(table[SCORING_FROM]).as_py(), pc.max(table[SCORING_TO]).as_py()
            self.scoring_from = began if self.scoring_from is None else min(self.scoring_from, began)
            self.scoring_to = ended if self.scoring_to is None else max(self.scoring_to, ended)
        for status, kind, duration in zip(
            *(table.column(c).to_pylist() for c in ("status", "error_kind", "duration_s"))
        ):
            if status == SCORED:
                self.scored += 1
                self.audio_s += duration
            elif status == FAILED:
                self.failures[kind] += 1
            else:
                self.errors[kind] += 1
        if now - self.last_print >= self.every_s:
            self.last_print = now
            rate = self.rate(time.time())
            eta = f"~{(self.todo - self.rows) / rate:.0f} s to go" if rate else "time to go not known yet"
            log(
                f"{self.rows}/{self.todo} answers ({100 * self.rows / max(self.todo, 1):.0f} %), "
                f"{sum(self.errors.values())} not scorable, {sum(self.failures.values())} failed, "
                f"{rate or 0:.1f} answers/s, {eta}"
            )

    def rate(self, now: float) -> float | None:
        """Answers per second since the engines began scoring (``now``: seconds since the epoch)."""
        if self.scoring_from is None or now <= self.scoring_from:
            return None
        return self.rows / (now - self.scoring_from)

    def steady(self) -> tuple[float | None, float]:
        """Answers per second over the scoring (first batch begun to last batch ended) and its seconds."""
        if self.scoring_from is None or self.scoring_to is None or self.scoring_to <= self.scoring_from:
            return None, 0.0
        span = self.scoring_to - self.scoring_from
        return self.rows / span, span


class StopSignals:
    """SIGINT (Ctrl-C, to the process or its group) and SIGTERM (a stopped pod) ask the run to stop: results that
    arrived are committed, and the run ends within seconds whatever it was waiting for."""

    def __init__(self):
        self.event = threading.Event()
        self._before: dict = {}

    def __enter__(self) -> StopSignals:
        self.claim()
        return self

    def claim(self) -> None:
        """Install the handlers (again after ``ray.init``, which installs its own for SIGTERM: that one stops Ray's
        processes and exits at once, with status 1 or 15 and without a word)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                before = signal.signal(sig, lambda *_: self.event.set())
                self._before.setdefault(sig, before)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)


_DONE = object()


def _results(ds, stop: threading.Event):
    """The pipeline's output tables, pulled by a thread of their own so that a stop is seen at once; ends early
    when ``stop`` is set."""
    out: queue.Queue = queue.Queue(maxsize=2)

    def pump() -> None:
        try:
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                out.put(table)
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread, which raises it
            out.put(e)
        finally:
            out.put(_DONE)

    threading.Thread(target=pump, name="session-results", daemon=True).start()
    while not stop.is_set():
        try:
            item = out.get(timeout=0.25)
        except queue.Empty:
            continue
        if item is _DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def session_identity(cfg: GraderConfig, parts: Mapping[str, Part], manifest: str, ids: list[str]) -> dict:
    """What an output folder scores: the manifest, its ids, the parts' models and the base model."""
    return {
        "manifest": manifest,
        "answers": len(ids),
        "response_ids_sha256": ids_digest(ids),
        "models": {name: part.model_id for name, part in parts.items()},
        "base": cfg.model.base,
    }


def run_session(cfg: GraderConfig, parts: Mapping[str, Part], opts: SessionOptions) -> dict:
    """Score the manifest's answers not yet in the output folder with the registered ``parts`` (the config's and
    those added at run time, as the service sees them); the summary. The manifest and the folder are checked before
    Ray starts (:class:`ManifestError`, :class:`OutputError`: nothing is created); a finished session starts
    neither. ``KeyboardInterrupt`` after a stop asked by SIGINT or SIGTERM (what arrived is committed)."""

    started = time.monotonic()
    manifest = load_manifest(opts.manifest)
    for line in check_parts(manifest, sorted(parts)):
        log(f"warning: {line}; those rows fail (not_scorable does not count them)")
    ids = manifest["response_id"].to_pylist()
    out = OutputDir(opts.out)
    identity = session_identity(cfg, parts, opts.manifest, ids)
    out.check_session(identity)
    retry = out.retryable()
    done = out.done_ids()
    todo = len(ids) - len(done) + retry
    if not todo:
        log(f"the session in {opts.out} is finished: all {len(ids)} answers of the manifest are there")
        return summary(
            parts,
            out,
            Progress(0, opts.progress_s),
            len(done),
            len(ids),
            time.monotonic() - started,
            cfg.candidate,
            candidate_intervals_of(cfg, parts, log=True),
        )
    progress = Progress(todo, opts.progress_s)
    with StopSignals() as signals:
        stop = signals.event
        out.record_session(identity)
        if retry:
            log(f"{retry} answer(s) of an earlier run failed in a way that may pass now: scoring them again")
            out.drop_retryable()
            done = out.done_ids()
        rows = manifest.filter(
            pc.invert(pc.is_in(manifest["response_id"], value_set=pa.array(sorted(done), pa.string())))
        )
        _score(rows, cfg, parts, opts, out, progress, signals, len(ids), len(done))
        # A stop that comes after the last answer arrived changes nothing.
        interrupted = stop.is_set() and progress.rows < todo
    wall = time.monotonic() - started
    if interrupted:
        log(f"stopped: {progress.rows} answers written this run; run the same command again to go on")
        raise KeyboardInterrupt
    return summary(
        parts, out, progress, len(done), len(ids), wall, cfg.candidate, candidate_intervals_of(cfg, parts, log=True)
    )


def _score(rows: pa.Table, cfg, parts, opts: SessionOptions, out: OutputDir, progress: Progress, signals, total, done):
    """Start Ray, stream ``rows`` through the pipeline and commit the results as they come."""
    import ray
    import ray.data

    from serve.runtime.ray_cluster import log_folder, start_ray

    stop = signals.event
    # Room for the engines plus one CPU task decoding at a time; the object store bounds the decoded audio
    # waiting for an engine.
    start_ray(opts.address, opts.engines * opts.engine_cpus, opts.object_store_mb * 2**20, opts.verbose)
    signals.claim()
    if not opts.verbose:
        log(f"engine and Ray logs: {log_folder()} (--verbose prints them here too)")
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = sys.stderr.isatty()
        ctx.print_on_execution_start = False
        decoding = "CPU tasks" if decode_in_tasks(opts) else "the engine actors"
        log(
            f"{total} answers in the manifest, {done} already in {opts.out}, {rows.num_rows} to score "
            f"with {opts.engines} engine(s), decoding in {decoding}"
        )
        writer = out.part_writer(opts.rows_per_part, opts.part_wait_s)
        if stop.is_set():
            return
        try:
            for table in _results(pipeline(ray.data.from_arrow(rows), cfg, parts, opts), stop):
                progress.add(table)
                writer.add(table.select(ANSWER_SCHEMA.names))
        finally:
            writer.flush()  # every result received is complete: keep it
    finally:
        ray.shutdown()


def summary(
    parts: Mapping[str, Part],
    out: OutputDir,
    progress: Progress,
    skipped: int,
    manifest_rows: int,
    wall: float,
    rule: CandidateConfig | None = None,
    intervals: CandidateIntervals | None = None,
) -> dict:
    """The session's figures: this run's throughput, the whole output's counts (the candidates' results by the
    exam's ``rule``, the config's ``candidate:`` section, their intervals from ``intervals``)."""
    candidates = out.write_candidates(parts, rule, intervals)
    written = out.read_parts(["response_id", "status", "error_kind"])
    ids = written.column("response_id").to_pylist()
    statuses = written.column("status").to_pylist()
    errors = list(zip(statuses, written.column("error_kind").to_pylist()))
    kinds = Counter(k for s, k in errors if s not in (SCORED, FAILED))
    failures = Counter(k for s, k in errors if s == FAILED)
    steady, span = progress.steady()
    return {
        "answers": len(ids),
        "manifest_rows": manifest_rows,
        "duplicates": len(ids) - len(set(ids)),
        "scored": sum(1 for s in statuses if s == SCORED),
        "not_scorable": dict(sorted(kinds.items())),
        "failed": dict(sorted(failures.items())),
        "retryable": out.retryable(),
        "candidates": candidates,
        "this_run": {
            "answers": progress.rows,
            "skipped": skipped,
            "not_scorable": dict(sorted(progress.errors.items())),
            "failed": dict(sorted(progress.failures.items())),
            "answers_per_s": round(progress.rows / wall, 3) if wall else 0.0,
            "audio_s_per_s": round(progress.audio_s / wall, 2) if wall else 0.0,
            "steady_answers_per_s": None if steady is None else round(steady, 3),
            "steady_audio_s_per_s": None
            if steady is None
            else round(progress.audio_s * steady / max(progress.rows, 1), 2),
            "steady_s": round(span, 3),
        },
        "wall_s": round(wall, 3),
        "out": out.location,
    }


def print_summary(s: dict) -> None:
    r = s["this_run"]
    kinds = ", ".join(f"{k} {v}" for k, v in s["not_scorable"].items()) or "none"
    failed = ", ".join(f"{k} {v}" for k, v in s["failed"].items()) or "none"
    print(
        f"answers: {s['answers']} of {s['manifest_rows']} in the manifest "
        f"({s['scored']} scored; not scorable: {kinds}; failed: {failed}); "
        f"{s['candidates']} candidates"
    )
    print(
        f"this run: {r['answers']} answers ({r['skipped']} already done) in {s['wall_s']:.1f} s: "
        f"{r['answers_per_s']:.2f} answers/s, {r['audio_s_per_s']:.1f} audio s/s"
        + (f" (while scoring: {r['steady_answers_per_s']:.2f} answers/s)" if r["steady_answers_per_s"] else "")
    )
    print(f"output: {s['out']}/answers/, {s['out']}/candidates.parquet")

    print(json.dumps(s))
