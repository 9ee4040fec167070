"""``l2grader score-session``: the driver of a session run.

Starts Ray locally (or joins ``--address``), reads the manifest, checks its
ids, skips the answers the output folder already holds, streams the rest
through :mod:`serve.session.stages` and commits the results in parts as they
come, then writes the candidates table and prints the summary (its last line
one JSON object).
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
import ray
import ray.data

from serve.grading.config import GraderConfig
from serve.grading.parts import Part
from serve.runtime.console import log
from serve.runtime.ray_cluster import log_folder, start_ray
from serve.session.schema import SCORED
from serve.session.sources import COLUMNS, ManifestError, audio_base, check_manifest_location, first_line, read_manifest
from serve.session.stages import Scorer, prepare
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


def _manifest_ids(ds) -> list[str]:
    """The manifest's response ids; :class:`ManifestError` for an empty or repeated id (the output's key), or for
    a column with no value at all (a JSON manifest without it)."""

    ids: list[str] = []
    filled = dict.fromkeys(COLUMNS, 0)
    for ref in ds.to_arrow_refs():
        block = ray.get(ref)
        ids += block.column("response_id").to_pylist()
        for c in COLUMNS:
            filled[c] += block.num_rows - block.column(c).null_count
    absent = [c for c, n in filled.items() if ids and n == 0]
    if absent:
        raise ManifestError(f"the manifest lacks the column(s) {', '.join(absent)} (it needs {', '.join(COLUMNS)})")
    empty = sum(1 for rid in ids if not rid)
    if empty:
        raise ManifestError(f"{empty} row(s) of the manifest have no response_id (every answer needs a unique one)")
    repeated = [rid for rid, n in Counter(ids).items() if n > 1]
    if repeated:
        shown = ", ".join(repr(r[:64]) for r in repeated[:5])
        raise ManifestError(f"{len(repeated)} response_id(s) appear more than once in the manifest, e.g. {shown}")
    return ids


def _drop_done(batch, done):

    return batch.filter(pc.invert(pc.is_in(batch.column("response_id"), value_set=done)))


def decode_in_tasks(opts: SessionOptions) -> bool:
    """Decode in CPU tasks of their own (on a cluster: spread over its CPU nodes), or in the engine actors.

    On one machine the tasks only compete with the engine for the same cores:
    on 2 cores, 1,000 answers of 8-20 s, the session ran at 0.79x the offline
    path's answers/s with decoding in tasks and 0.99x with it in the engine actor.
    """
    return opts.decode == "tasks" or (opts.decode == "auto" and bool(opts.address))


def pipeline(ds, cfg: GraderConfig, parts: Mapping[str, Part], opts: SessionOptions, done: set[str]):
    """The Ray Data pipeline from manifest rows (not yet done) to answer rows."""

    if done:
        ds = ds.map_batches(
            _drop_done, fn_kwargs={"done": pa.array(sorted(done), pa.string())}, batch_format="pyarrow", batch_size=None
        )
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
    """A progress line on stderr every few seconds, and the run's timings."""

    def __init__(self, todo: int, every_s: float):
        self.todo, self.every_s = todo, every_s
        self.start = self.last_print = time.monotonic()
        self.first_t: float | None = None
        self.first_rows = 0
        self.last_t = self.start
        self.rows = self.scored = 0
        self.audio_s = 0.0
        self.errors: Counter[str] = Counter()

    def add(self, table) -> None:
        now = time.monotonic()
        if self.first_t is None:
            self.first_t, self.first_rows = now, table.num_rows
        self.last_t = now
        self.rows += table.num_rows
        for status, kind, duration in zip(
            *(table.column(c).to_pylist() for c in ("status", "error_kind", "duration_s"))
        ):
            if status == SCORED:
                self.scored += 1
                self.audio_s += duration
            else:
                self.errors[kind] += 1
        if now - self.last_print >= self.every_s:
            self.last_print = now
            rate = self.rows / (now - self.start)
            eta = (self.todo - self.rows) / rate if rate else float("nan")
            log(
                f"{self.rows}/{self.todo} answers ({100 * self.rows / max(self.todo, 1):.0f} %), "
                f"{sum(self.errors.values())} not scorable, {rate:.1f} answers/s, ~{eta:.0f} s to go"
            )

    def steady(self) -> tuple[float | None, float]:
        """Answers per second from the first result to the last (engine start-up and the first batch left out)."""
        if self.first_t is None or self.last_t <= self.first_t:
            return None, 0.0
        span = self.last_t - self.first_t
        return (self.rows - self.first_rows) / span, span


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


def run_session(cfg: GraderConfig, parts: Mapping[str, Part], opts: SessionOptions) -> dict:
    """Score the manifest's answers not yet in the output folder with the registered ``parts`` (the config's and
    those added at run time, as the service sees them); the summary. ``KeyboardInterrupt`` after a stop asked by
    SIGINT or SIGTERM (what arrived is committed)."""

    started = time.monotonic()
    out = OutputDir(opts.out)
    check_manifest_location(opts.manifest)  # before Ray starts: a wrong name or format costs no start-up
    progress = Progress(0, opts.progress_s)
    todo: int | None = None  # answers to score this run, once the manifest and the output were read
    with StopSignals() as signals:
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
            try:
                manifest = read_manifest(opts.manifest).materialize()
            except ManifestError:
                raise
            except Exception as e:  # noqa: BLE001 - a reader's error inside Ray: one line
                raise ManifestError(f"cannot read the manifest {opts.manifest}: {first_line(e)}") from None
            ids = _manifest_ids(manifest)
            out.check_session(
                {
                    "manifest": opts.manifest,
                    "answers": len(ids),
                    "response_ids_sha256": ids_digest(ids),
                    "models": {name: part.model_id for name, part in parts.items()},
                    "base": cfg.model.base,
                }
            )
            done = out.done_ids()
            todo = len(ids) - len(done)
            decoding = "CPU tasks" if decode_in_tasks(opts) else "the engine actors"
            log(
                f"{len(ids)} answers in the manifest, {len(done)} already in {opts.out}, {todo} to score "
                f"with {opts.engines} engine(s), decoding in {decoding}"
            )
            progress = Progress(todo, opts.progress_s)
            writer = out.part_writer(opts.rows_per_part, opts.part_wait_s)
            if todo and not stop.is_set():
                try:
                    for table in _results(pipeline(manifest, cfg, parts, opts, done), stop):
                        progress.add(table)
                        writer.add(table)
                finally:
                    writer.flush()  # every result received is complete: keep it
        finally:
            ray.shutdown()
        # A stop that comes after the last answer arrived changes nothing.
        interrupted = stop.is_set() and (todo is None or progress.rows < todo)
    wall = time.monotonic() - started
    if interrupted:
        log(f"stopped: {progress.rows} answers written this run; run the same command again to go on")
        raise KeyboardInterrupt
    return summary(parts, out, progress, len(done), len(ids), wall)


def summary(
    parts: Mapping[str, Part], out: OutputDir, progress: Progress, skipped: int, manifest_rows: int, wall: float
) -> dict:
    """The session's figures: this run's throughput, the whole output's counts."""
    candidates = out.write_candidates(parts)
    written = out.read_parts(["response_id", "status", "error_kind"])
    ids = written.column("response_id").to_pylist()
    statuses = written.column("status").to_pylist()
    kinds = Counter(k for s, k in zip(statuses, written.column("error_kind").to_pylist()) if s != SCORED)
    steady, span = progress.steady()
    return {
        "answers": len(ids),
        "manifest_rows": manifest_rows,
        "duplicates": len(ids) - len(set(ids)),
        "scored": sum(1 for s in statuses if s == SCORED),
        "not_scorable": dict(sorted(kinds.items())),
        "candidates": candidates,
        "this_run": {
            "answers": progress.rows,
            "skipped": skipped,
            "not_scorable": dict(sorted(progress.errors.items())),
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
    print(
        f"answers: {s['answers']} of {s['manifest_rows']} in the manifest "
        f"({s['scored']} scored; not scorable: {kinds}); "
        f"{s['candidates']} candidates"
    )
    print(
        f"this run: {r['answers']} answers ({r['skipped']} already done) in {s['wall_s']:.1f} s: "
        f"{r['answers_per_s']:.2f} answers/s, {r['audio_s_per_s']:.1f} audio s/s"
        + (f" (after start-up: {r['steady_answers_per_s']:.2f} answers/s)" if r["steady_answers_per_s"] else "")
    )
    print(f"output: {s['out']}/answers/, {s['out']}/candidates.parquet")

    print(json.dumps(s))
