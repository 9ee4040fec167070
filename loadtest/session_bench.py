"""``l2grader bench-session``: a session on Ray Data against the offline batch path, and its peak memory.

Generates ``--answers`` answers (the benchmark's speech-like WAV files, parts in
turn) and a CSV manifest, then in one run

(a) ``session``: ``l2grader score-session`` over the manifest in its own process
    group, sampling the memory of its whole process tree (the driver, Ray's
    processes, the CPU tasks, the engine actor and the engine's processes)
    every ``--sample-s`` seconds: peak PSS (shared pages split between the
    processes that map them, so the object store counts once) and peak RSS sum;
(b) ``offline``: the same answers through :class:`serve.engine.offline.OfflineEngine`
    (``vllm.LLM``) in one batch, as ``l2grader bench`` runs it (warm-up first).

Throughput of the session is taken from its first result to its last (engine
start-up and the first batch left out, as the offline path's warm-up leaves
them out); the whole run's figure is printed too. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from serve.runtime.console import log


class TreeMemory:
    """Peak memory of a process tree, sampled in a thread: PSS sum and RSS sum (bytes)."""

    def __init__(self, pid: int, every_s: float):
        self.pid, self.every_s = pid, every_s
        self.peak_pss = self.peak_rss = 0
        self.processes = 0
        self.at_peak: dict[str, int] = {}  # process -> PSS (bytes) in the sample with the highest sum
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        pss = rss = 0
        by_process: dict[str, int] = {}
        for p in procs:
            try:
                m = p.memory_full_info()
                name = " ".join(p.cmdline())[:40] or p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            pss += m.pss
            rss += m.rss
            by_process[f"{name} [{p.pid}]"] = m.pss
        if pss > self.peak_pss:
            self.at_peak = by_process
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
        self.processes = max(self.processes, len(procs))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_session(answers, out: Path) -> Path:
    """The answers as WAV files and a CSV manifest (two candidates' answers in turn); the manifest's path."""
    audio = out / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["response_id", "candidate_id", "part", "audio"])
        for i, a in enumerate(answers):
            (audio / f"{i:06d}.wav").write_bytes(a.audio)
            w.writerow([f"r{i:06d}", f"c{i // 4:05d}", a.part, f"audio/{i:06d}.wav"])
    return manifest


def session_phase(config: str, manifest: Path, out: Path, batch_size: int, sample_s: float) -> dict:
    from loadtest.service import l2grader_cmd

    result_dir = out / "result"
    if result_dir.exists():
        import shutil

        shutil.rmtree(result_dir)
    cmd = [
        *l2grader_cmd(),
        "score-session",
        "--config",
        config,
        "--manifest",
        str(manifest),
        "--out",
        str(result_dir),
        "--batch-size",
        str(batch_size),
    ]
    log(f"(a) session: {' '.join(cmd[1:])} (log {out / 'session.log'})")
    with open(out / "session.log", "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, start_new_session=True)
        try:
            with TreeMemory(proc.pid, sample_s) as mem:
                stdout, _ = proc.communicate()
        except BaseException:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
            raise
    if proc.returncode != 0:
        raise RuntimeError(f"score-session exited {proc.returncode}; see {out / 'session.log'}")
    s = json.loads(stdout.splitlines()[-1])
    run = s["this_run"]
    return {
        "path": "session",
        "answers": run["answers"],
        "wall_s": s["wall_s"],
        "answers_per_s": run["steady_answers_per_s"],
        "audio_s_per_s": run["steady_audio_s_per_s"],
        "whole_run_answers_per_s": run["answers_per_s"],
        "not_scorable": s["not_scorable"],
        "peak_pss_mb": round(mem.peak_pss / 2**20),
        "peak_rss_sum_mb": round(mem.peak_rss / 2**20),
        "processes": mem.processes,
        "peak_by_process_mb": {k: round(v / 2**20) for k, v in sorted(mem.at_peak.items(), key=lambda kv: -kv[1])[:8]},
    }


def run(args: argparse.Namespace) -> dict:
    from loadtest.bench import make_answers, offline_engine, offline_phase
    from loadtest.service import ensure_tiny_model
    from serve.cli.common import load_config_or_exit

    cfg = load_config_or_exit(args.config)
    ensure_tiny_model(cfg)
    out = Path(args.out or "runs/bench-session")
    out.mkdir(parents=True, exist_ok=True)
    parts = sorted(cfg.parts)
    answers = make_answers(parts, args.answers, args.min_s, args.max_s, seed=args.seed)
    manifest = write_session(answers, out)
    log(
        f"{len(answers)} answers of {args.min_s:g}-{args.max_s:g} s ({sum(a.seconds for a in answers):.0f} s of audio) "
        f"in {manifest}"
    )
    paths = {"session": session_phase(args.config, manifest, out, args.batch_size, args.sample_s)}
    if not args.skip_offline:
        warmup = make_answers(parts, min(16, args.answers), args.min_s, args.max_s, seed=args.seed + 1)
        engine = offline_engine(cfg, warmup)
        try:
            off = offline_phase(cfg, answers, engine)
        finally:
            engine.shutdown()
        paths["offline"] = {k: v for k, v in off.items() if k not in ("scores", "p50_ms", "p95_ms")}
    ratio = None
    if "offline" in paths and paths["session"]["answers_per_s"]:
        ratio = round(paths["session"]["answers_per_s"] / paths["offline"]["answers_per_s"], 3)
    return {
        "answers": len(answers),
        "answer_s": [args.min_s, args.max_s],
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "paths": paths,
        "session_over_offline_answers_per_s": ratio,
    }


def cmd_bench_session(args: argparse.Namespace) -> int:
    result = run(args)
    s = result["paths"]["session"]
    print(
        f"{result['answers']} answers of {result['answer_s'][0]:g}-{result['answer_s'][1]:g} s, "
        f"{result['cpu_count']} CPUs, batch {result['batch_size']}"
    )
    print(
        f"session: {s['answers_per_s']:.2f} answers/s ({s['audio_s_per_s']:.0f} audio s/s) after start-up, "
        f"{s['whole_run_answers_per_s']:.2f} answers/s over the whole run ({s['wall_s']:.0f} s); "
        f"peak memory of {s['processes']} processes: {s['peak_pss_mb']} MB PSS ({s['peak_rss_sum_mb']} MB RSS summed)"
    )
    if "offline" in result["paths"]:
        o = result["paths"]["offline"]
        print(
            f"offline: {o['answers_per_s']:.2f} answers/s ({o['audio_s_per_s']:.0f} audio s/s); "
            f"session / offline: {result['session_over_offline_answers_per_s']:.2f}x"
        )
    print(json.dumps(result))
    return 0


def add_bench_session_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-session", help="a session on Ray Data vs the offline batch path; its peak memory")
    p.add_argument("--config", required=True, help="grader YAML config")
    p.add_argument("--answers", type=int, default=1000, help="answers in the session (default 1000)")
    p.add_argument("--min-s", type=float, default=8.0, help="shortest answer, seconds (default 8)")
    p.add_argument("--max-s", type=float, default=20.0, help="longest answer, seconds (default 20)")
    p.add_argument("--batch-size", type=int, default=64, help="score-session's --batch-size (default 64)")
    p.add_argument("--skip-offline", action="store_true", help="only the session (e.g. for memory alone)")
    p.add_argument("--sample-s", type=float, default=0.5, help="memory sampling period (default 0.5 s)")
    p.add_argument("--seed", type=int, default=7, help="seed of the generated answers (default 7)")
    p.add_argument(
        "--out", help="folder for the answers, the manifest, the result and the log (default runs/bench-session)"
    )
    p.set_defaults(func=cmd_bench_session)
