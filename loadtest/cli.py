"""``l2grader loadtest``, ``l2grader bench`` and ``l2grader bench-session`` (an ``l2grader.commands`` entry point).

Locust runs as its own process: gevent's monkey-patching and Ray do not live
in one interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from serve.cli.common import fail, load_config_or_exit

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def summarise(record: dict, wall_s: float, service_cpu_s: float | None = None) -> dict:
    """The run's figures from the locustfile's exact record."""
    from loadtest.service import percentile

    lat = record["latencies_ms"]
    statuses = {k: v for k, v in record["statuses"].items()}
    errors = {k: v for k, v in statuses.items() if k != "200"}
    answers = len(lat)
    out = {
        "requests": sum(statuses.values()),
        "answers": answers,
        "wall_s": round(wall_s, 2),
        "requests_per_s": round(sum(statuses.values()) / wall_s, 3) if wall_s else 0.0,
        "answers_per_s": round(answers / wall_s, 3) if wall_s else 0.0,
        "audio_s_per_s": round(record["audio_s"] / wall_s, 2) if wall_s else 0.0,
        "chunks": record["chunks"],
        "p50_ms": round(percentile(lat, 50), 1),
        "p95_ms": round(percentile(lat, 95), 1),
        "p99_ms": round(percentile(lat, 99), 1),
        "errors": errors,
        "retries": record.get("retries", 0),
        "answers_given_up": record.get("given_up", 0),
        "refusal_kinds": record.get("refusal_kinds", {}),
        "refusals_without_retry_after": record.get("refusals_without_retry_after", 0),
    }
    if service_cpu_s is not None and answers:
        out["service_cpu_ms_per_answer"] = round(service_cpu_s * 1000 / answers, 2)
    return out


def per_part(record: dict) -> dict[str, dict]:
    """Answers, p50/p95 latency and refused or failed attempts of each part, from the locustfile's record."""
    from loadtest.service import percentile

    out = {}
    for part, r in sorted(record.get("by_part", {}).items()):
        lat = r["latencies_ms"]
        out[part] = {
            "answers": len(lat),
            "p50_ms": round(percentile(lat, 50), 1),
            "p95_ms": round(percentile(lat, 95), 1),
            "errors": {k: v for k, v in r["statuses"].items() if k != "200"},
        }
    return out


def run_locust(cmd: list[str], env: dict, log) -> subprocess.Popen:
    """Run Locust to its end. SIGTERM ends the run early with a whole summary: it is passed on as SIGUSR1, on
    which the locustfile stops as at its time limit (answers in flight finish, the record is written)."""
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def end_early(*_):
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)

    previous = signal.signal(signal.SIGTERM, end_early)
    try:
        proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return proc


def cmd_loadtest(args: argparse.Namespace) -> int:
    from loadtest.mix import parse_mix, parse_parts
    from loadtest.service import Service, TreeCpu, client_key, ensure_tiny_model

    cfg = load_config_or_exit(args.config)
    try:
        parse_mix(args.mix)
        parse_parts(args.parts or "")
    except ValueError as e:
        fail(str(e))
    out = Path(args.out or f"runs/loadtest-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    key, service_env = client_key(cfg, args.api_key)

    service = None
    if not args.url:
        ensure_tiny_model(cfg)
        print(
            f"l2grader: starting the service (log: {out / 'serve.log'}); engine start-up takes a minute",
            file=sys.stderr,
            flush=True,
        )
        service = Service(args.config, out / "serve.log", env=service_env)
        url = service.url
    else:
        url = args.url.rstrip("/")
    try:
        env = {
            **os.environ,
            "L2GRADER_MIX": args.mix,
            "L2GRADER_FORMATS": args.formats,
            "L2GRADER_WAIT_S": str(args.wait),
            "L2GRADER_POOL": str(args.pool),
            "L2GRADER_SHAPE": args.shape,
            "L2GRADER_USERS": str(args.users),
            "L2GRADER_DURATION_S": str(args.duration),
            "L2GRADER_STEPS": str(args.steps),
            "L2GRADER_STATS": str(out / "answers.json"),
            "L2GRADER_UNIQUE": "0" if args.repeat_files else "1",
            "L2GRADER_RETRIES": str(args.retries),
        }
        if key:
            env["L2GRADER_API_KEY"] = key
        if args.parts:
            env["L2GRADER_PARTS"] = args.parts
        # Locust imports loadtest.audio: make the package importable whatever the working directory.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        cmd = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--host",
            url,
            "-u",
            str(args.users),
            "-r",
            str(args.spawn_rate or args.users),
            "-t",
            f"{int(args.duration)}s",
            "--stop-timeout",
            str(args.stop_timeout),
            "--csv",
            str(out / "locust"),
            "--csv-full-history",
            "--html",
            str(out / "report.html"),
            "--only-summary",
            "--loglevel",
            "WARNING",
        ]
        cpu = TreeCpu(service.pids()) if service else None
        if cpu:
            cpu.start()
        print(
            f"l2grader: {args.users} users for {args.duration:g} s ({args.shape}) against {url}",
            file=sys.stderr,
            flush=True,
        )
        with open(out / "locust.log", "w") as log:
            locust = run_locust(cmd, env, log)
        service_cpu_s = cpu.stop() if cpu else None
    finally:
        if service is not None:
            service.stop()

    stats_file = out / "answers.json"
    if not stats_file.exists():
        print((out / "locust.log").read_text()[-3000:], file=sys.stderr)
        fail(f"Locust exited (code {locust.returncode}) without a record; see {out / 'locust.log'}", 1)
    record = json.loads(stats_file.read_text())
    wall = (record["last_end"] - record["first_start"]) if record["first_start"] else 0.0
    s = summarise(record, wall, service_cpu_s)
    s["parts"] = record["parts"]
    s["by_part"] = per_part(record)
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "none"
    print(
        f"requests/s {s['requests_per_s']:.2f}   answers/s {s['answers_per_s']:.2f}   "
        f"audio s scored per wall s {s['audio_s_per_s']:.1f}   ({s['answers']} answers, {s['chunks']} chunks "
        f"in {s['wall_s']:.1f} s, parts {', '.join(s['parts'])})"
    )
    print(f"latency p50 {s['p50_ms']:.0f} ms   p95 {s['p95_ms']:.0f} ms   p99 {s['p99_ms']:.0f} ms")
    if len(s["by_part"]) > 1:
        print(
            "per part: "
            + "   ".join(f"{p} {v['answers']} answers p95 {v['p95_ms']:.0f} ms" for p, v in s["by_part"].items())
        )
    if "service_cpu_ms_per_answer" in s:
        print(f"service CPU per answer {s['service_cpu_ms_per_answer']:.1f} ms (whole process tree)")
    print(
        f"refused or failed attempts by status: {errors}   retried {s['retries']}, given up after retries "
        f"{s['answers_given_up']}   files: {out}/locust_stats.csv, {out}/report.html"
    )
    print(json.dumps(s))
    bad = {k: v for k, v in s["errors"].items() if k not in ("503", "429")}  # "not now": retried, intended
    return 1 if bad or s["answers"] == 0 else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``loadtest``, ``bench``, ``bench-aspects``, ``bench-cluster``, ``bench-session``, ``soak``, ``bench-vad``
    and ``bench-chunks`` to the parser."""
    p = sub.add_parser("loadtest", help="load-test the service with Locust (starts it unless --url is given)")
    p.add_argument("--config", required=True, help="grader YAML config")
    p.add_argument(
        "--users", type=int, default=16, help="simulated upload workers (the step shape's peak) (default 16)"
    )
    p.add_argument("--duration", type=float, default=60, help="seconds of load (default 60)")
    p.add_argument("--url", help="service to test (default: start `l2grader serve --config FILE` on a free port)")
    p.add_argument("--out", help="folder for Locust's CSVs, the HTML report and logs (default runs/loadtest-TIME)")
    p.add_argument(
        "--shape",
        choices=["constant", "step"],
        default="constant",
        help="constant user count, or a step ramp up to --users (default constant)",
    )
    p.add_argument("--steps", type=int, default=5, help="steps of the step ramp (default 5)")
    p.add_argument(
        "--mix",
        default="short:80,medium:17,long:3",
        help="answer lengths: short 10-20 s, medium 30-60 s, long 3-5 min (default short:80,medium:17,long:3)",
    )
    p.add_argument("--formats", default="wav", help="upload formats, rotated: wav,flac,ogg,mp3 (default wav)")
    p.add_argument(
        "--parts",
        help="comma-separated parts, each with an optional weight, e.g. interview:40,long_turn:20,part_3 "
        "(default: every part of the service's GET /v1/parts, equally)",
    )
    p.add_argument(
        "--repeat-files",
        action="store_true",
        help="send the pool's files byte for byte (the engine's caches then see repeats; default: "
        "every WAV upload differs in one inaudible sample)",
    )
    p.add_argument("--pool", type=int, default=8, help="answers generated per length class (default 8)")
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="times an answer refused with 503/429 is sent again after Retry-After, same response_id (default 3)",
    )
    p.add_argument("--wait", type=float, default=0.5, help="think time between a user's answers, uniform 0..WAIT s")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: all at once)")
    p.add_argument("--stop-timeout", type=int, default=120, help="seconds in-flight answers may finish at the end")
    p.add_argument("--api-key", help="bearer key (default: the first key of the config's api_keys_env variable)")
    p.set_defaults(func=cmd_loadtest)

    from loadtest.aspects_bench import add_bench_aspects_command
    from loadtest.bench import add_bench_command
    from loadtest.cluster_bench import add_bench_cluster_command
    from loadtest.cutoff_bench import add_bench_cutoff_command
    from loadtest.session_bench import add_bench_session_command
    from loadtest.soak import add_soak_command
    from loadtest.vad_bench import add_bench_chunks_command, add_bench_vad_command

    add_bench_command(sub)
    add_bench_aspects_command(sub)
    add_bench_cluster_command(sub)
    add_bench_session_command(sub)
    add_soak_command(sub)
    add_bench_vad_command(sub)
    add_bench_chunks_command(sub)
    add_bench_cutoff_command(sub)
