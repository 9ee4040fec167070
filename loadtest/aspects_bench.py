"""What analytic aspects cost: the same answers scored holistically only, and with the part's aspects shared or
independent, side by side on one engine (``l2grader bench-aspects``).

Rows, all through :class:`serve.engine.offline.OfflineEngine` (one ``vllm.LLM`` in this process):

- ``holistic``: one request per chunk, the holistic score only: the part as it would be without aspects (its
  prompt without the aspects' rubrics);
- ``shared``: the service's design, one request per chunk and target, the aspects' requests right after the
  holistic one with the same audio array: vLLM processes and encodes the chunk's audio once and, where the part's
  adapter scores the aspect, prefills the rubric and the audio once (its prefix cache);
- ``independent``: the same requests, each with its own vLLM ``cache_salt``: no prefix-cache block is shared;
  vLLM's processor and encoder caches still recognise the same audio (they are keyed by its content);
- ``separate`` (``--rows``): as ``independent``, and each request has its own copy of the audio (one sample
  differs), so nothing is shared: what scoring each aspect by its own service would cost.

Every run gets fresh audio (the same answers, one inaudible sample changed), so no run profits from another's
caches; rows take turns in each repeat, and the report gives each row's medians over ``--repeats``: answers per
wall second, CPU milliseconds per answer (this process and its children: the engine process, its workers),
prefill tokens per answer (each request's prompt tokens less those vLLM found in its prefix cache), and the ratio
of each to the holistic row's. The last line is all of it as one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import time
from collections.abc import Sequence

import numpy as np

from serve.runtime.console import log

ROWS = ("holistic", "shared", "independent", "separate")
SHARES = {
    "holistic": "one request per chunk (the part without aspects)",
    "shared": "per chunk: audio processing, audio encoding, prefix cache (rubric + audio, part adapter)",
    "independent": "per chunk: audio processing and encoding (content-keyed caches); no prefix cache (own cache_salt)",
    "separate": "nothing (own cache_salt, own copy of the audio per request)",
}


def prefill_tokens(outputs) -> tuple[int, int]:
    """(tokens prefilled, tokens read from the prefix cache) of finished requests (vLLM ``RequestOutput``)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    cached = sum(o.num_cached_tokens or 0 for o in outputs)
    return prompt - cached, cached


def run_figures(answers: int, wall_s: float, cpu_s: float, requests: int, prefill: int, cached: int) -> dict:
    """One run's figures, per answer."""
    return {
        "answers_per_s": answers / wall_s if wall_s else 0.0,
        "cpu_ms_per_answer": cpu_s * 1000 / answers,
        "requests_per_answer": requests / answers,
        "prefill_tokens_per_answer": prefill / answers,
        "cached_tokens_per_answer": cached / answers,
    }


def medians(runs: Sequence[dict]) -> dict:
    """Each figure's median over a row's runs."""
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}


def cost_ratios(row: dict, base: dict) -> dict:
    """What a row costs over the holistic row: wall time, CPU and prefill tokens per answer, as factors."""

    def ratio(a, b):
        return round(a / b, 2) if b else None

    return {
        "time": ratio(base["answers_per_s"], row["answers_per_s"]),  # seconds per answer over the holistic row's
        "cpu": ratio(row["cpu_ms_per_answer"], base["cpu_ms_per_answer"]),
        "prefill": ratio(row["prefill_tokens_per_answer"], base["prefill_tokens_per_answer"]),
    }


_fresh = itertools.count(1)


def fresh_chunk(chunk):
    """The chunk with a copy of its audio whose last sample differs inaudibly: vLLM's caches have not seen it."""
    samples = chunk.samples.copy()
    samples[-1] += np.float32(next(_fresh) * 1e-6)
    return dataclasses.replace(chunk, samples=samples)


def fresh_answers(answers):
    """The answers with fresh audio (see :func:`fresh_chunk`)."""
    return [(part, dataclasses.replace(p, chunks=[fresh_chunk(c) for c in p.chunks])) for part, p in answers]


def run_row(engine, row: str, answers, specs) -> dict:
    """Score the answers (fresh audio) as the row says; its figures."""
    from loadtest.service import TreeCpu

    answers = fresh_answers(answers)
    cpu = TreeCpu([os.getpid()])
    cpu.start()
    t0 = time.perf_counter()
    requests = engine.requests(answers, specs)
    salts = None
    if row in ("independent", "separate"):
        salts = [f"{row}-{next(_fresh)}" for _ in requests]
    if row == "separate":
        requests = [(target, fresh_chunk(chunk)) for target, chunk in requests]
    outputs = engine.generate(requests, salts)
    engine.results(answers, outputs, specs)
    wall = time.perf_counter() - t0
    cpu_s = cpu.stop()
    return run_figures(len(answers), wall, cpu_s, len(outputs), *prefill_tokens(outputs))


def make_prepared(cfg, part: str, n: int, min_s: float, max_s: float, long_n: int, long_s: float, seed: int):
    """``n`` answers to ``part`` (``long_n`` of them ``max_s``-``long_s`` s long, so cut into chunks), decoded,
    measured and chunked as the service does."""
    from loadtest.bench import make_answers
    from serve.grading.audio import prepare

    raw = make_answers([part], n - long_n, min_s, max_s, seed) + make_answers([part], long_n, max_s, long_s, seed + 1)
    return [(a.part, prepare(a.audio, cfg.audio)) for a in raw]


def without_aspects(engine, cfg, part: str):
    """The part resolved as it would be without its aspects: the holistic prompt has no aspect rubrics then."""
    from serve.grading.parts import check_part, resolve_part

    plain = check_part(part, cfg.parts[part].model_copy(update={"aspects": {}}), cfg.engine.max_lora_rank)
    return resolve_part(plain, engine.llm.get_tokenizer(), cfg)


def run_bench(args: argparse.Namespace) -> dict:
    from loadtest.service import ensure_tiny_model
    from serve.cli.common import fail, load_config_or_exit
    from serve.engine.offline import OfflineEngine
    from serve.grading.config import UnknownPartError

    cfg = load_config_or_exit(args.config)
    ensure_tiny_model(cfg)
    part = args.part or max(cfg.parts, key=lambda p: len(cfg.parts[p].aspects))
    if part not in cfg.parts:
        fail(str(UnknownPartError(part, sorted(cfg.parts))))
    if not cfg.parts[part].aspects:
        fail(f"part {part!r} has no aspects in {args.config}")
    rows = ["holistic", *[r for r in args.rows if r != "holistic"]]
    long_n = round(args.answers * args.long_share)
    answers = make_prepared(cfg, part, args.answers, args.min_s, args.max_s, long_n, args.long_s, args.seed)
    warmup = make_prepared(cfg, part, args.warmup, args.min_s, args.max_s, 1, args.long_s, args.seed + 7)
    chunks = sum(len(p.chunks) for _, p in answers)
    audio_s = sum(c.duration_s for _, p in answers for c in p.chunks)
    log(
        f"{len(answers)} answers to {part} ({long_n} of {args.max_s:g}-{args.long_s:g} s, the rest "
        f"{args.min_s:g}-{args.max_s:g} s; {chunks} chunks, {audio_s:.0f} s of audio); rows {', '.join(rows)}"
    )
    engine = OfflineEngine(cfg)
    try:
        spec = engine.parts[part]
        specs = {"holistic": {part: without_aspects(engine, cfg, part)}}
        runs: dict[str, list[dict]] = {r: [] for r in rows}
        for r in rows:  # warm-up: adapters loaded, first calls compiled
            run_row(engine, r, warmup, specs.get(r))
        for rep in range(args.repeats):
            order = rows[rep % len(rows) :] + rows[: rep % len(rows)]  # each row takes each place in turn
            for r in order:
                runs[r].append(run_row(engine, r, answers, specs.get(r)))
                log(
                    f"repeat {rep + 1}/{args.repeats} {r}: "
                    + json.dumps({k: round(v, 1) for k, v in runs[r][-1].items()})
                )
    finally:
        engine.shutdown()
    result_rows = {r: medians(v) for r, v in runs.items()}
    base = result_rows["holistic"]
    return {
        "part": part,
        "aspects": [a.aspect for a in spec.aspects],
        "aspect_adapters": sorted({a.model_id for a in spec.aspects}),
        "answers": len(answers),
        "chunks": chunks,
        "audio_s": round(audio_s, 1),
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "rows": {r: {**v, "shares": SHARES[r], "over_holistic": cost_ratios(v, base)} for r, v in result_rows.items()},
    }


def print_report(result: dict) -> None:
    print(
        f"{result['answers']} answers to {result['part']} ({result['chunks']} chunks, {result['audio_s']:g} s of "
        f"audio), aspects {', '.join(result['aspects'])}; medians of {result['repeats']} interleaved repeats, "
        f"fresh audio each run, {result['cpu_count']} CPUs"
    )
    print(
        f"{'row':<12} {'answers/s':>9} {'CPU ms/ans':>10} {'prefill tok/ans':>15} {'cached tok/ans':>14} "
        f"{'req/ans':>7}   {'x time':>6} {'x CPU':>6} {'x prefill':>9}   shares"
    )
    for name, r in result["rows"].items():
        x = r["over_holistic"]
        print(
            f"{name:<12} {r['answers_per_s']:>9.2f} {r['cpu_ms_per_answer']:>10.1f} "
            f"{r['prefill_tokens_per_answer']:>15.0f} {r['cached_tokens_per_answer']:>14.0f} "
            f"{r['requests_per_answer']:>7.2f}   {x['time']:>6.2f} {x['cpu']:>6.2f} {x['prefill']:>9.2f}   "
            f"{r['shares']}"
        )
    print(json.dumps(result))


def cmd_bench_aspects(args: argparse.Namespace) -> int:
    print_report(run_bench(args))
    return 0


def add_bench_aspects_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-aspects", help="what a part's analytic aspects cost over the holistic score, shared or independent"
    )
    p.add_argument("--config", required=True, help="grader YAML config")
    p.add_argument("--part", help="part whose aspects are measured (default: the config's part with the most)")
    p.add_argument("--answers", type=int, default=64, help="answers per run (default 64)")
    p.add_argument("--min-s", type=float, default=10.0, help="shortest answer, seconds (default 10)")
    p.add_argument("--max-s", type=float, default=30.0, help="longest single-chunk answer, seconds (default 30)")
    p.add_argument("--long-s", type=float, default=60.0, help="longest of the long answers, seconds (default 60)")
    p.add_argument("--long-share", type=float, default=0.25, help="share of answers longer than --max-s (default 0.25)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every row (default 3)")
    p.add_argument("--warmup", type=int, default=8, help="warm-up answers per row, not counted (default 8)")
    p.add_argument(
        "--rows",
        nargs="+",
        choices=ROWS,
        default=["holistic", "shared", "independent"],
        help="rows besides holistic (default: shared independent)",
    )
    p.add_argument("--seed", type=int, default=11, help="seed of the generated answers (default 11)")
    p.set_defaults(func=cmd_bench_aspects)
