"""``l2grader``: the grader's command line.

This module holds the serving commands (``score``, ``serve``,
``serve-config``). The adapter tools and the load tests add theirs through
the entry-point group ``l2grader.commands`` (see pyproject.toml), so
``serve`` imports neither ``adapters`` nor ``loadtest``.

Subcommands import what they need (pydantic, vLLM, Ray, torch) only when they
run, so ``l2grader --help`` and argument errors answer at once: the imports
inside functions here are for that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path

from serve.cli.common import PROG, engine_output, fail, load_config_or_exit, log, parts_or_exit
from serve.runtime.console import library_output_to

#: Entry-point group of the subcommands other packages add: ``add_commands(subparsers)``.
COMMANDS_GROUP = "l2grader.commands"


# ---------------------------------------------------------------- score


def _prepared(paths: Sequence[str], audio_cfg) -> Iterator[tuple[str, object]]:
    """(path, PreparedAnswer) or (path, AudioError) for each file, in order."""
    from serve.grading.audio import AudioError, prepare  # each command loads what it needs when it runs (see above)

    for path in paths:
        try:
            yield path, prepare(path, audio_cfg)
        except AudioError as e:
            yield path, e


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def cmd_score(args: argparse.Namespace) -> int:
    """One JSON object per file, in order: the scored answer, or why it has none (``status`` not_scorable or
    failed, with its ``reason``, as a batch's results); with ``--candidate``, then one object ``{"candidate_id",
    "overall"}``: the files' overall result by the config's ``candidate:`` rule. Exit 1 when a file was not
    scored."""
    cfg = load_config_or_exit(args.config)
    parts = parts_or_exit(cfg, args.config, [args.part])
    if cfg.model.untrained:
        log("WARNING: scoring with the tiny UNTRAINED demo checkpoint (random weights): scores mean nothing")
    with engine_output("score", args.verbose):
        return _score_files(args, cfg, parts)


def _score_files(args: argparse.Namespace, cfg, parts) -> int:
    from serve.engine.offline import OfflineEngine  # loaded when the command runs: the CLI starts fast
    from serve.grading.adapter_files import AdapterError
    from serve.grading.answers import candidate_result, unscored
    from serve.grading.audio import PreparedAnswer
    from serve.grading.parts import LabelTokenError

    intervals = None
    if getattr(args, "candidate", None) is not None and cfg.candidate.calibration is not None:
        from serve.grading.parts import candidate_intervals_of

        # checked before scoring, against every registered part (the rule counts parts this run does not score)
        intervals = candidate_intervals_of(cfg, parts_or_exit(cfg, args.config))
    scorer = None
    failed = 0
    results_all = []
    try:
        # Decode the next batch of files in the background while the engine scores this one.
        with ThreadPoolExecutor(max_workers=1) as pool:
            batches = _batches(_prepared(args.audio, cfg.audio), args.batch_size)
            pending = pool.submit(next, batches, None)
            while (batch := pending.result()) is not None:
                pending = pool.submit(next, batches, None)
                good = [prepared for _, prepared in batch if isinstance(prepared, PreparedAnswer)]
                if good and scorer is None:
                    try:
                        scorer = OfflineEngine(cfg, parts)
                    except (LabelTokenError, AdapterError, ValueError) as e:
                        fail(str(e))
                results = iter(scorer.score_answers([(args.part, p) for p in good]) if good else [])
                for path, prepared in batch:
                    if isinstance(prepared, PreparedAnswer):
                        result = next(results)
                        results_all.append(result)
                        print(json.dumps({"file": path, **result.model_dump()}), flush=True)
                    else:  # its result as every door gives it (not_scorable, or failed), and the error line
                        failed += 1
                        result = unscored(args.part, prepared.kind, str(prepared))
                        results_all.append(result)
                        print(json.dumps({"file": path, **result.model_dump()}), flush=True)
                        print(f"{PROG}: error: {path}: {prepared}", file=sys.stderr, flush=True)
    finally:
        if scorer is not None:
            scorer.shutdown()  # frees the engine's memory now, not at interpreter exit
    if getattr(args, "candidate", None) is not None:
        overall = candidate_result(results_all, {args.part: parts[args.part].config.levels}, cfg.candidate, intervals)
        print(json.dumps({"candidate_id": args.candidate, "overall": overall.model_dump()}), flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------- score-session


def cmd_score_session(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.config)
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    for name in ("engines", "batch_size", "rows_per_part", "object_store_mb"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    from serve.engine.requests import configure_vllm_environment  # loaded when the command runs: the CLI starts fast
    from serve.grading.adapter_files import AdapterError
    from serve.session.run import SessionOptions, print_summary, run_session
    from serve.session.sources import ManifestError
    from serve.session.store import OutputError

    configure_vllm_environment()
    if cfg.model.untrained:
        log("WARNING: the tiny UNTRAINED demo checkpoint (random weights): scores mean nothing")
    parts = parts_or_exit(cfg, args.config)  # the parts added with PUT /v1/parts too
    scorer = cfg.serving.scorer  # an engine actor is sized as a scorer replica
    opts = SessionOptions(
        manifest=args.manifest,
        out=args.out,
        address=args.address,
        engines=args.engines or scorer.autoscaling.max_replicas,
        engine_cpus=scorer.num_cpus,
        engine_gpus=scorer.num_gpus,
        batch_size=args.batch_size,
        rows_per_part=args.rows_per_part,
        decode=args.decode,
        object_store_mb=args.object_store_mb,
        verbose=args.verbose,
    )
    quiet = contextlib.nullcontext()
    if not args.verbose:
        own_log = (
            Path(tempfile.gettempdir()) / PROG / f"score-session-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        )
        quiet = library_output_to(own_log)  # Ray's C++ lines of this process (its workers log in the Ray log folder)
        log(f"this process's library output: {own_log} (--verbose prints it here)")
    try:
        with quiet:
            s = run_session(cfg, parts, opts)
    except (ManifestError, OutputError, AdapterError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        return 130
    print_summary(s)
    if s["duplicates"]:
        log(f"error: {s['duplicates']} answer(s) appear more than once in {args.out}/answers/")
        return 1
    if s["answers"] != s["manifest_rows"]:
        log(
            f"error: {args.out} holds {s['answers']} of the manifest's {s['manifest_rows']} answers; "
            "run the same command again to score the rest"
        )
        return 1
    if s["failed"]:
        n = sum(s["failed"].values())
        failed = ", ".join(f"{k} {v}" for k, v in s["failed"].items())
        todo = [f"run the same command again to retry the {s['retryable']} retryable one(s)"] if s["retryable"] else []
        todo += [f"fix the manifest's rows of the other {n - s['retryable']}"] if n > s["retryable"] else []
        log(
            f"error: the grader failed to score {n} answer(s) ({failed}): the candidates' results are incomplete "
            f"(complete: false); {' and '.join(todo)}"
        )
        return 1
    if s["answers"] and not s["scored"]:
        log("error: no answer of the session could be scored")
        return 1
    return 0


# ---------------------------------------------------------------- session-job


def cmd_session_job(args: argparse.Namespace) -> int:
    import yaml  # loaded when the command runs: the CLI starts fast

    from serve.service.kuberay import session_rayjob

    cfg = load_config_or_exit(args.config)
    try:
        docs = [d for d in yaml.safe_load_all(sys.stdin if args.rayservice == "-" else open(args.rayservice)) if d]
    except (OSError, yaml.YAMLError) as e:
        fail(f"cannot read the rendered RayService: {e}")
    services = [d for d in docs if isinstance(d, dict) and d.get("kind") == "RayService"]
    if len(services) != 1:
        fail(
            f"expected one RayService in {args.rayservice} (kubectl kustomize k8s/overlays/NAME), found {len(services)}"
        )
    try:
        job = session_rayjob(services[0], cfg, args.config, args.manifest, args.out, args.engines, args.name)
    except (KeyError, ValueError) as e:
        fail(f"the RayService does not have the expected groups: {e}")
    print(yaml.safe_dump(job, sort_keys=False), end="")
    return 0


# ---------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    load_config_or_exit(args.config)  # fail fast, one line, on a bad config
    from serve.service.server import run_server  # loads Ray: only in the command that serves

    return run_server(args.config, args.host, args.port, args.address, args.allow_unauthenticated, args.verbose)


def cmd_edge(args: argparse.Namespace) -> int:
    """``l2grader edge``: the HAProxy edge beside an ingress pod (Kubernetes)."""
    from serve.service.server import run_edge  # loads Ray: only in the command that runs the edge

    return run_edge(args.config, args.address, args.node_ip, args.host, args.port, args.proxy_port)


def cmd_deploy(args: argparse.Namespace) -> int:
    load_config_or_exit(args.config)
    from serve.service.server import deploy_config  # loads Ray: only in the command that deploys

    return deploy_config(args.config, args.address)


# ---------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    """Each registered part: its adapter, and whether its answers get an interval (and, if not, why); then whether
    the candidates' overall interval comes from the candidate calibration (and, if not, why)."""
    cfg = load_config_or_exit(args.config)
    from serve.grading.parts import CalibrationRequiredError, part_intervals

    problems = 0
    parts = parts_or_exit(cfg, args.config)
    for name, part in parts.items():
        try:
            state = part_intervals(part, cfg).state
        except CalibrationRequiredError as e:
            problems += 1
            print(f"{name}: NOT SERVABLE: {e}")
            continue
        cal = state.calibration
        extra = ""
        if cal is not None and cal.small_sample is not None:
            lo, hi = cal.small_sample.coverage_range
            extra = f" (small sample: {cal.n} of the {cal.small_sample.required} answers needed; realised coverage "
            extra += f"{100 * lo:.1f}-{100 * hi:.1f}%)"
        iv = part.config.interval
        print(
            f"{name}: {part.model_id}; intervals: {state.status} ({iv.method}, {100 * iv.coverage:.0f}%): "
            f"{state.detail}{extra}"
        )
    if cfg.candidate.calibration is not None:
        from serve.grading.parts import candidate_intervals_of

        c = candidate_intervals_of(cfg, parts)
        small = c.state.calibration.small_sample if c.state.calibration is not None else None
        print(
            f"candidates' overall interval: {c.state.status} ({c.method}, {100 * c.coverage:.0f}%): "
            f"{cfg.candidate.calibration.path}: {c.state.detail}"
            + ("" if c.state.calibration is not None else "; the parts' union bound serves instead")
            + (
                ""
                if small is None
                else f" (small sample: {c.state.calibration.n} of the {small.required} candidates needed; realised "
                f"coverage {100 * small.coverage_range[0]:.1f}-{100 * small.coverage_range[1]:.1f}%)"
            )
        )
    return 1 if problems else 0


# ---------------------------------------------------------------- serve-config


def cmd_serve_config(args: argparse.Namespace) -> int:
    import yaml  # loaded when the command runs: the CLI starts fast

    from serve.service.options import serve_config

    cfg = load_config_or_exit(args.config)
    print(
        yaml.safe_dump(serve_config(cfg, args.config_path or str(Path(args.config).resolve())), sort_keys=False), end=""
    )
    return 0


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Score spoken English answers (CEFR-aligned).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("score", help="score audio files offline with one engine; one JSON object per file")
    p.add_argument("--config", required=True, help="grader YAML config")
    p.add_argument("--part", required=True, help="exam part the answers belong to")
    p.add_argument("--batch-size", type=int, default=256, help="answers sent to the engine together (default 256)")
    p.add_argument("--verbose", action="store_true", help="print the engine's own log here (else: to a file)")
    p.add_argument(
        "--candidate",
        metavar="ID",
        help="the files are this candidate's answers: print their overall result last, by the config's candidate: "
        "rule, as the batch endpoint's overall",
    )
    p.add_argument("audio", nargs="+", help="audio files (WAV, FLAC, OGG, MP3, WebM/Opus, MP4/M4A/AAC, ...)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("score-session", help="score a whole session's manifest in bulk on Ray Data (resumable)")
    p.add_argument("--config", required=True, help="grader YAML config")
    p.add_argument(
        "--manifest",
        required=True,
        help="CSV, JSON Lines or Parquet with response_id, candidate_id, part, audio (path or URI)",
    )
    p.add_argument("--out", required=True, help="output folder or URI (run again with the same --out to go on)")
    p.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    p.add_argument(
        "--engines",
        type=int,
        help="engine actors, one GPU each on GPU hosts (default: serving.scorer.autoscaling.max_replicas)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="answers per engine call and per CPU task (default 64)")
    p.add_argument("--rows-per-part", type=int, default=1024, help="answers per output part at most (default 1024)")
    p.add_argument(
        "--decode",
        choices=["auto", "tasks", "engines"],
        default="auto",
        help="decode audio in CPU tasks of their own or in the engine actors before each batch "
        "(default auto: tasks with --address, engines on one machine)",
    )
    p.add_argument(
        "--object-store-mb",
        type=int,
        default=1024,
        help="local Ray's object store: bounds the decoded audio waiting for an engine (default 1024)",
    )
    p.add_argument("--verbose", action="store_true", help="show the engine's own log")
    p.set_defaults(func=cmd_score_session)

    p = sub.add_parser(
        "session-job", help="print a KubeRay RayJob that runs score-session on the service's cluster spec"
    )
    p.add_argument("--config", required=True, help="the overlay's grader config (configs/FILE, as in the image)")
    p.add_argument("--manifest", required=True, help="the manifest's URI as the pods see it (s3://..., /var/lib/...)")
    p.add_argument("--out", required=True, help="the output URI as the pods see it (shared by all pods)")
    p.add_argument("--engines", type=int, help="engine pods (default: serving.scorer.autoscaling.max_replicas)")
    p.add_argument("--name", default="l2grader-session", help="the RayJob's name (default l2grader-session)")
    p.add_argument(
        "--rayservice",
        default="-",
        help="the rendered overlay holding the RayService (default: stdin, `kubectl kustomize k8s/overlays/gpu`)",
    )
    p.set_defaults(func=cmd_session_job)

    p = sub.add_parser(
        "check", help="check the config's parts: adapters, and whether each part's calibration is valid (and why not)"
    )
    p.add_argument("--config", required=True, help="grader YAML config")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("serve", help="run the HTTP scoring service (Ray Serve + vLLM)")
    p.add_argument("--config", required=True, help="grader YAML config")
    p.add_argument("--host", help="address to listen on (default: serving.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: serving.port, 8000)")
    p.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="without API keys in the config, still accept clients beyond this machine",
    )
    p.add_argument("--verbose", action="store_true", help="print Ray's, Ray Serve's and the engine's logs here too")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "edge", help="run the HAProxy edge in front of this node's ingress replicas (beside a Kubernetes pod)"
    )
    p.add_argument("--config", required=True, help="grader YAML config (the cluster's)")
    p.add_argument("--address", required=True, help="the Ray cluster's address (the head's GCS, host:6379)")
    p.add_argument("--node-ip", required=True, help="this node's address as Ray knows it (the pod's IP)")
    p.add_argument("--host", default="0.0.0.0", help="address the edge listens on (default: 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="the API's port (default: 8000)")
    p.add_argument("--proxy-port", type=int, default=8001, help="Serve's proxy on this node, the backup (8001)")
    p.set_defaults(func=cmd_edge)

    p = sub.add_parser("deploy", help="update the service running on a Ray cluster to a new config, in place")
    p.add_argument("--config", required=True, help="the new grader YAML config (at the same path on every node)")
    p.add_argument("--address", required=True, help="the Ray cluster's address (where `l2grader serve --address` runs)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("serve-config", help="print the Ray Serve config (serveConfigV2) the service runs with")
    p.add_argument("--config", required=True, help="grader YAML config")
    p.add_argument("--config-path", help="where the config lies on the cluster (default: its path here)")
    p.set_defaults(func=cmd_serve_config)

    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            add_commands = entry.load()
        except ModuleNotFoundError as e:
            if e.name != entry.module.split(".")[0]:
                raise
            continue  # that package is not installed here (the service image leaves loadtest/ out)
        add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
