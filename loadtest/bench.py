"""Benchmark: the same answers scored by the service, the offline batch path and the plain pipeline.

``l2grader bench --config FILE`` generates a set of answers (speech-like audio,
one seed each, parts taken in turn) and scores all of them, in one run, through

(a) ``service``: ``l2grader serve`` started on a free loopback port (or one
    already running, ``--url`` with ``--service-pid``), the answers posted over
    HTTP (multipart) by concurrent clients;
(b) ``offline``: :class:`serve.engine.offline.OfflineEngine` (``vllm.LLM``), every answer
    decoded and sent to the engine in one batch, in this process;
(c) ``reference``: transformers + peft (:class:`adapters.reference.ReferenceScorer`),
    one answer at a time, the way a research grader runs; measured first, before
    the offline engine starts, since ``vllm.LLM`` changes process-wide state that
    outlives it (torch's thread setting, environment variables, random seeds).

Each path gets a warm-up on other answers first, so engine start-up, adapter
loads and first-call compilation are left out. It prints each path's
throughput (answers/s, audio seconds scored per wall second), latency
(p50/p95) and CPU time per answer, the ratios, and as its last line all of it
as one JSON object. The service's CPU time is that of its whole process tree
(Ray's processes, both replicas, the engine process) during the HTTP phase;
the offline path's is that of this process and its engine process.

A shared machine's load moves each path by several per cent from one run to
the next: ``--rounds N`` runs the service and offline paths N times,
alternated (a fresh service each round unless ``--url``; one offline engine,
kept warm; each round the same parts and lengths with new audio, so that no
cache has seen it), prints each round, and reports the median of each figure
over the rounds, the ratios being the medians of each round's own ratio.

With a GPU (``torch.cuda.is_available()``) the reference path runs instead a
Qwen2-Audio-7B-shaped model with random bf16 weights and a rank-16 adapter per
part, and reports its model-FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loadtest.multipart import multipart_answer
from loadtest.retry import RETRYABLE, retry_delay
from serve.runtime.console import log

# Published shapes of Qwen2-Audio-7B(-Instruct).
QWEN2_AUDIO_7B_AUDIO = dict(
    d_model=1280,
    encoder_layers=32,
    encoder_attention_heads=20,
    encoder_ffn_dim=5120,
    num_mel_bins=128,
    max_source_positions=1500,
)
QWEN2_AUDIO_7B_TEXT = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
    vocab_size=156032,
    max_position_embeddings=8192,
)
# Dense bf16 peak of the GPU (FLOP/s), by name; L2GRADER_PEAK_TFLOPS overrides.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


@dataclass
class Answer:
    part: str
    seconds: float
    audio: bytes  #: the file as uploaded
    fmt: str = "wav"


def make_answers(
    parts: list[str], n: int, min_s: float, max_s: float, seed: int, variant: int = 0, fmt: str = "wav"
) -> list[Answer]:
    """``n`` distinct 16 kHz answers in ``fmt`` (wav, flac, ogg, mp3), lengths uniform in [min_s, max_s], parts in
    turn. Another ``variant`` gives the same parts and lengths with other audio, which no engine cache has seen."""
    from loadtest.audio import answer_bytes

    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = round(rng.uniform(min_s, max_s), 2)
        audio = answer_bytes(s, seed * 100_003 + i + variant * 1_000_003, fmt=fmt)
        out.append(Answer(parts[i % len(parts)], s, audio, fmt))
    return out


def summary(
    name: str,
    latencies_s: list[float],
    wall_s: float,
    answers: int,
    audio_s: float,
    cpu_s: float | None,
    errors: dict[str, int] | None = None,
) -> dict:
    from loadtest.service import percentile

    ms = [x * 1000 for x in latencies_s]
    return {
        "path": name,
        "answers": answers,
        "wall_s": round(wall_s, 3),
        "answers_per_s": round(answers / wall_s, 3) if wall_s else 0.0,
        "audio_s_per_s": round(audio_s / wall_s, 2) if wall_s else 0.0,
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "cpu_ms_per_answer": None if cpu_s is None else round(cpu_s * 1000 / max(answers, 1), 2),
        "errors": errors or {},
    }


# ---------------------------------------------------------------- (a) the service over HTTP


def _post(port: int, answer: Answer, headers: dict[str, str], retries: int = 3) -> tuple[int, float, dict]:
    """Score one answer; a 503/429 or a broken connection is sent again (same response_id) after Retry-After."""
    form = multipart_answer(answer.part, answer.audio, f"a.{answer.fmt}")
    body = form.with_response_id(uuid.uuid4().hex)
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        retry_after = None
        try:
            conn.request("POST", "/v1/score", body=body, headers={**headers, "Content-Type": form.content_type})
            r = conn.getresponse()
            data = r.read()
            status, retry_after = r.status, r.getheader("Retry-After")
        except OSError:
            status, data = 0, b""
        finally:
            conn.close()
        if (status not in RETRYABLE and status != 0) or attempt == retries:
            break
        time.sleep(retry_delay(attempt, retry_after))
    elapsed = time.perf_counter() - t0
    try:
        got = json.loads(data) if status == 200 else {}
    except ValueError:
        status, got = -1, {}
    return status, elapsed, got


def _post_all(port: int, answers: list[Answer], concurrency: int, headers: dict[str, str]):
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda a: _post(port, a, headers), answers))


def service_phase(
    config: str,
    cfg,
    answers: list[Answer],
    warmup: list[Answer],
    concurrency: int,
    out: Path,
    idle_s: float = 3.0,
    url: str | None = None,
    service_pid: int | None = None,
    api_key: str | None = None,
) -> dict:
    from loadtest.service import Service, TreeCpu, client_key

    key, env = client_key(cfg, api_key)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if url:
        log(f"(a) service: the one at {url} (CPU of process {service_pid}'s tree)")
        service, port, pids = None, int(url.rsplit(":", 1)[1].split("/")[0]), [service_pid]
    else:
        log(f"(a) service: starting `l2grader serve` (log {out / 'bench-serve.log'})")
        service = Service(config, out / "bench-serve.log", env=env)
        port, pids = service.port, service.pids()
    try:
        _post_all(port, warmup, concurrency, headers)
        cpu = TreeCpu(pids)
        cpu.start()
        time.sleep(idle_s)
        idle_cpu_s = cpu.stop()  # Ray's background work with no traffic
        log(f"(a) service: {len(answers)} answers, {concurrency} concurrent clients")
        cpu.start()
        t0 = time.perf_counter()
        results = _post_all(port, answers, concurrency, headers)
        wall = time.perf_counter() - t0
        cpu_s = cpu.stop()
    finally:
        if service is not None:
            service.stop()
    errors: dict[str, int] = {}
    for status, _, _ in results:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    ok = [(lat, got) for status, lat, got in results if status == 200]
    s = summary("service", [lat for lat, _ in ok], wall, len(ok), sum(g["duration_s"] for _, g in ok), cpu_s, errors)
    s["idle_cpu_ms_per_s"] = round(idle_cpu_s * 1000 / idle_s, 1)
    s["cpu_ms_per_answer_by_process"] = {
        kind: round(used * 1000 / max(1, len(ok)), 1)
        for kind, used in sorted(cpu.by_process.items(), key=lambda kv: -kv[1])
        if used * 1000 / max(1, len(ok)) >= 0.1
    }
    s["scores"] = [None if status != 200 else got["score"] for status, _, got in results]
    return s


# ---------------------------------------------------------------- (b) offline batch


def offline_engine(cfg, warmup: list[Answer]):
    """The offline path's engine (``vllm.LLM`` in this process), warmed up on ``warmup``; the caller closes it."""
    from serve.engine.offline import OfflineEngine
    from serve.grading.audio import prepare

    log("(b) offline: starting the engine (vllm.LLM)")
    scorer = OfflineEngine(cfg)
    try:
        scorer.score_answers([(a.part, prepare(a.audio, cfg.audio)) for a in warmup])
    except BaseException:
        scorer.shutdown()
        raise
    return scorer


def offline_phase(cfg, answers: list[Answer], scorer) -> dict:
    """Every answer decoded and scored by ``scorer`` (:func:`offline_engine`) in one batch."""
    from loadtest.service import TreeCpu
    from serve.grading.audio import prepare

    log(f"(b) offline: {len(answers)} answers in one batch")
    cpu = TreeCpu([os.getpid()])
    cpu.start()
    t0 = time.perf_counter()
    results = scorer.score_answers([(a.part, prepare(a.audio, cfg.audio)) for a in answers])
    wall = time.perf_counter() - t0
    cpu_s = cpu.stop()
    # Every answer of the batch is done when the batch is: its latency is the batch's.
    s = summary("offline", [wall] * len(results), wall, len(results), sum(r.duration_s for r in results), cpu_s)
    s["scores"] = [r.score for r in results]
    return s


# ---------------------------------------------------------------- (c) plain transformers + peft


def reference_phase(cfg, answers: list[Answer], warmup: list[Answer]) -> dict:
    from adapters.reference import ReferenceScorer
    from loadtest.service import TreeCpu
    from serve.grading.audio import prepare_answer

    log("(c) reference: loading transformers + peft")
    ref = ReferenceScorer(cfg)
    for a in warmup[:2]:
        ref.score_answer(a.part, prepare_answer(a.audio, cfg.audio))
    log(f"(c) reference: {len(answers)} answers one at a time")
    lat, audio_s, scores = [], 0.0, []
    cpu = TreeCpu([os.getpid()])
    cpu.start()
    t0 = time.perf_counter()
    for a in answers:
        t = time.perf_counter()
        r = ref.score_answer(a.part, prepare_answer(a.audio, cfg.audio))
        lat.append(time.perf_counter() - t)
        audio_s += r.duration_s
        scores.append(r.score)
    wall = time.perf_counter() - t0
    s = summary("reference", lat, wall, len(answers), audio_s, cpu.stop())
    s["scores"] = scores
    return s


# ---------------------------------------------------------------- GPU: 7B-shaped plain pipeline


def build_7b_shaped_model(processor, parts: list[str], device: str = "cuda", rank: int = 16):
    """Qwen2-Audio-7B's published shapes, random bf16 weights on ``device``, one rank-``rank`` adapter per part."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    from serve.engine.transformers_private import model_from_config
    from serve.grading.adapter_files import LANGUAGE_MODEL_TARGETS

    config = Qwen2AudioConfig(
        audio_config=dict(QWEN2_AUDIO_7B_AUDIO),
        text_config=dict(QWEN2_AUDIO_7B_TEXT),
        audio_token_index=processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = model_from_config(Qwen2AudioForConditionalGeneration, config, torch.bfloat16).eval()
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LANGUAGE_MODEL_TARGETS, bias="none")
    model = get_peft_model(model, lora, adapter_name=parts[0])
    for part in parts[1:]:
        model.add_adapter(part, lora)
    with torch.no_grad():  # non-zero adapters, so the LoRA matmuls are not skipped by anything
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    model.eval()
    audio_params = sum(p.numel() for n, p in model.named_parameters() if "audio_tower" in n)
    lm_params = sum(
        p.numel() for n, p in model.named_parameters() if "audio_tower" not in n and "embed_tokens" not in n
    )
    return model, audio_params, lm_params


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of the GPU (FLOP/s); ``L2GRADER_PEAK_TFLOPS`` overrides."""
    if os.environ.get("L2GRADER_PEAK_TFLOPS"):
        return float(os.environ["L2GRADER_PEAK_TFLOPS"]) * 1e12
    for key, value in PEAK_BF16.items():
        if key in device_name:
            return value
    return None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model-FLOPs utilisation: achieved FLOP/s over the device's peak."""
    return None if not peak or seconds <= 0 else flops / seconds / peak


def gpu_reference_phase(cfg, answers: list[Answer], warmup: list[Answer]) -> dict:
    """The plain pipeline on a Qwen2-Audio-7B-shaped random bf16 model, one answer at a time, with its MFU.

    FLOPs: 2 x parameters x positions, the encoder at its fixed 1500 positions per
    chunk (Whisper pads every chunk to 30 s), the language model at the prompt's tokens.
    """
    import torch
    from transformers import AutoProcessor

    from adapters.reference import processor_inputs
    from serve.grading.audio import prepare_answer
    from serve.grading.parts import resolve_parts

    processor = AutoProcessor.from_pretrained(cfg.model.base)
    specs = resolve_parts(cfg, processor.tokenizer)
    parts = sorted(specs)
    model, audio_params, lm_params = build_7b_shaped_model(processor, parts)
    name = torch.cuda.get_device_name()
    log(
        f"(c) reference on {name}: Qwen2-Audio-7B-shaped random bf16 model "
        f"({(audio_params + lm_params) / 1e9:.2f} B parameters without embeddings)"
    )

    @torch.inference_mode()
    def one(a: Answer) -> float:
        """Score one answer chunk by chunk; its FLOPs."""
        spec = specs[a.part]
        model.set_adapter(a.part)
        flops = 0.0
        for c in prepare_answer(a.audio, cfg.audio):
            inputs = processor_inputs(processor, spec.prompt, [c.samples], "cuda", torch.bfloat16)
            model(**inputs).logits[0, -1].float().cpu()
            flops += 2.0 * (audio_params * 1500 + lm_params * int(inputs["input_ids"].shape[1]))
        return flops

    for a in warmup[:2]:
        one(a)
    torch.cuda.synchronize()
    lat, flops = [], 0.0
    t0 = time.perf_counter()
    for a in answers:
        t = time.perf_counter()
        flops += one(a)
        torch.cuda.synchronize()
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    s = summary("reference", lat, wall, len(answers), sum(a.seconds for a in answers), None)
    s.update(
        device=name,
        model="Qwen2-Audio-7B-shaped, random bf16",
        tflops=round(flops / wall / 1e12, 2),
        mfu=mfu(flops, wall, peak_flops(name)),
    )
    return s


# ---------------------------------------------------------------- the command


def _ratio(a, b) -> float | None:
    return None if not a or not b else round(a / b, 2)


def run_bench(args: argparse.Namespace) -> dict:
    from loadtest.service import ensure_tiny_model
    from serve.cli.common import fail, load_config_or_exit
    from serve.grading.config import UnknownPartError

    cfg = load_config_or_exit(args.config)
    parts = [p.strip() for p in args.parts.split(",")] if args.parts else sorted(cfg.parts)
    for part in parts:
        if part not in cfg.parts:
            fail(str(UnknownPartError(part, sorted(cfg.parts))))
    ensure_tiny_model(cfg)
    out = Path(args.out or "runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    answers = make_answers(parts, args.answers, args.min_s, args.max_s, seed=args.seed, fmt=args.format)
    warmup = make_answers(
        parts, min(args.warmup, args.answers), args.min_s, args.max_s, seed=args.seed + 1, fmt=args.format
    )
    audio_total = sum(a.seconds for a in answers)
    log(
        f"{len(answers)} {args.format} answers of {args.min_s:g}-{args.max_s:g} s ({audio_total:.0f} s of audio, "
        f"{sum(len(a.audio) for a in answers) / 1e6:.1f} MB), parts {', '.join(parts)}"
    )

    import torch

    gpu = torch.cuda.is_available() and not args.no_gpu
    # The reference first: the offline engine (vllm.LLM in this process) changes process-wide state for good
    # (it replaces torch.set_num_threads, sets environment variables, seeds the random generators), so the
    # plain pipeline is measured in the process as it started. Its answers are the first round's.
    reference = None
    if "reference" not in args.skip:
        ref_answers = answers[: args.reference_answers] if args.reference_answers else answers
        reference = (gpu_reference_phase if gpu else reference_phase)(cfg, ref_answers, warmup)
    rounds: list[dict[str, dict]] = []
    engine = None
    try:
        for r in range(args.rounds):
            if args.rounds > 1:
                log(f"round {r + 1} of {args.rounds}")
            # Each round new audio (same parts and lengths): the kept offline engine (or a --url service) must not
            # find the earlier rounds' answers in its prefix and audio caches.
            if r:
                answers = make_answers(
                    parts, args.answers, args.min_s, args.max_s, seed=args.seed, variant=r, fmt=args.format
                )
            paths = {}
            if "service" not in args.skip:
                paths["service"] = service_phase(
                    args.config,
                    cfg,
                    answers,
                    warmup,
                    args.concurrency,
                    out,
                    url=args.url,
                    service_pid=args.service_pid,
                    api_key=args.api_key,
                )
            if "offline" not in args.skip:
                engine = engine or offline_engine(cfg, warmup)
                paths["offline"] = offline_phase(cfg, answers, engine)
            rounds.append(paths)
    finally:
        if engine is not None:
            engine.shutdown()
    paths = _median_paths(rounds)
    if reference is not None:
        paths["reference"] = reference

    sv, off, ref = paths.get("service"), paths.get("offline"), paths.get("reference")
    result = {
        "answers": len(answers),
        "answer_s": [args.min_s, args.max_s],
        "concurrency": args.concurrency,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "cpu_count": os.cpu_count(),
        "paths": {k: {x: y for x, y in v.items() if x != "scores"} for k, v in paths.items()},
        "ratios": {
            "service_over_offline_answers_per_s": _median([_service_over_offline(r) for r in rounds]),
            "service_over_reference_answers_per_s": _ratio(sv and sv["answers_per_s"], ref and ref["answers_per_s"]),
            "offline_over_reference_answers_per_s": _ratio(off and off["answers_per_s"], ref and ref["answers_per_s"]),
        },
    }
    extra = [_extra_cpu_ms(r) for r in rounds]
    if sv and off and None not in extra:
        result["service_extra_cpu_ms_per_answer"] = _median(extra)
    if args.rounds > 1:
        result["rounds"] = [
            {
                **{
                    f"{name}_{figure}": r[name][figure] if name in r else None
                    for figure in ("answers_per_s", "cpu_ms_per_answer")
                    for name in ("service", "offline")
                },
                "service_over_offline_answers_per_s": _service_over_offline(r),
                "service_extra_cpu_ms_per_answer": _extra_cpu_ms(r),
            }
            for r in rounds
        ]
    if sv and off and not gpu:
        diffs = [
            abs(a - b)
            for r in rounds
            for a, b in zip(r["service"]["scores"], r["offline"]["scores"])
            if a is not None and b is not None
        ]
        result["max_score_diff_service_offline"] = max(diffs) if diffs else None
    return result


def _median(values: list) -> float | None:
    """The median of the values that are not None (None when none is)."""
    xs = [v for v in values if v is not None]
    return round(statistics.median(xs), 3) if xs else None


#: A path's figures that are medians over the rounds (errors are added up, the rest kept from the first round).
MEDIAN_FIGURES = (
    "wall_s",
    "answers_per_s",
    "audio_s_per_s",
    "p50_ms",
    "p95_ms",
    "cpu_ms_per_answer",
    "idle_cpu_ms_per_s",
)


def _median_paths(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Each path's figures over the rounds: medians, errors added up, the first round's scores."""
    merged: dict[str, dict] = {}
    for name in rounds[0] if rounds else ():
        runs = [r[name] for r in rounds]
        m = {**runs[0], "rounds": len(runs)}
        for key in MEDIAN_FIGURES:
            if key in m:
                m[key] = _median([run[key] for run in runs])
        errors: dict[str, int] = {}
        for run in runs:
            for status, count in run["errors"].items():
                errors[status] = errors.get(status, 0) + count
        m["errors"] = errors
        if "cpu_ms_per_answer_by_process" in m:  # each process kind's median over the rounds
            kinds = {k for run in runs for k in run.get("cpu_ms_per_answer_by_process", {})}
            by_kind = {k: _median([run["cpu_ms_per_answer_by_process"].get(k, 0.0) for run in runs]) for k in kinds}
            m["cpu_ms_per_answer_by_process"] = dict(sorted(by_kind.items(), key=lambda kv: -(kv[1] or 0)))
        merged[name] = m
    return merged


def _service_over_offline(paths: dict[str, dict]) -> float | None:
    sv, off = paths.get("service"), paths.get("offline")
    return _ratio(sv and sv["answers_per_s"], off and off["answers_per_s"])


def _extra_cpu_ms(paths: dict[str, dict]) -> float | None:
    sv, off = paths.get("service"), paths.get("offline")
    if not sv or not off or sv["cpu_ms_per_answer"] is None or off["cpu_ms_per_answer"] is None:
        return None
    return round(sv["cpu_ms_per_answer"] - off["cpu_ms_per_answer"], 2)


def print_report(result: dict) -> None:
    rows = result["paths"]
    print(
        f"{result['answers']} answers of {result['answer_s'][0]:g}-{result['answer_s'][1]:g} s on {result['device']} "
        f"({result['cpu_count']} CPUs); service with {result['concurrency']} concurrent clients"
    )
    for i, r in enumerate(result.get("rounds", []), 1):
        ratio, extra = r["service_over_offline_answers_per_s"], r["service_extra_cpu_ms_per_answer"]
        figures = [
            f"{name} {r[f'{name}_answers_per_s']} answers/s ({r[f'{name}_cpu_ms_per_answer']} CPU ms/answer)"
            for name in ("service", "offline")
            if r[f"{name}_answers_per_s"] is not None
        ]
        if ratio is not None:
            figures.append(f"{ratio:.2f}x")
        if extra is not None:
            figures.append(f"{extra:+.1f} CPU ms/answer over offline")
        print(f"round {i}: " + ", ".join(figures))
    if "rounds" in result:
        print(f"medians of the {len(result['rounds'])} rounds:")
    print(
        f"{'path':<10} {'answers/s':>10} {'audio s/s':>10} {'p50 ms':>9} {'p95 ms':>9} "
        f"{'CPU ms/answer':>14} {'errors':>7}"
    )
    for name, r in rows.items():
        cpu = "-" if r["cpu_ms_per_answer"] is None else f"{r['cpu_ms_per_answer']:.1f}"
        print(
            f"{name:<10} {r['answers_per_s']:>10.2f} {r['audio_s_per_s']:>10.1f} {r['p50_ms']:>9.0f} "
            f"{r['p95_ms']:>9.0f} {cpu:>14} {sum(r['errors'].values()):>7}"
        )
    for k, v in result["ratios"].items():
        if v is not None:
            print(f"{k.replace('_', ' ')}: {v:.2f}x")
    by_process = rows.get("service", {}).get("cpu_ms_per_answer_by_process")
    if by_process:
        print("service CPU ms per answer by process: " + ", ".join(f"{k} {v:.1f}" for k, v in by_process.items()))
    if "service_extra_cpu_ms_per_answer" in result:
        print(
            f"service CPU over offline per answer: {result['service_extra_cpu_ms_per_answer']:+.1f} ms "
            f"(service idle background: {rows['service']['idle_cpu_ms_per_s']:.0f} CPU ms/s)"
        )
    print(json.dumps(result))


def cmd_bench(args: argparse.Namespace) -> int:
    result = run_bench(args)
    print_report(result)
    return 1 if any(sum(r["errors"].values()) for r in result["paths"].values()) else 0


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="score the same answers through the service, the offline path and plain transformers"
    )
    p.add_argument("--config", required=True, help="grader YAML config")
    p.add_argument("--answers", type=int, default=256, help="answers scored by each path (default 256)")
    p.add_argument("--min-s", type=float, default=8.0, help="shortest answer, seconds (default 8)")
    p.add_argument("--max-s", type=float, default=20.0, help="longest answer, seconds (default 20)")
    p.add_argument("--format", default="wav", choices=["wav", "flac", "ogg", "mp3"], help="upload format (default wav)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP clients of the service (default 32)")
    p.add_argument(
        "--reference-answers",
        type=int,
        default=64,
        help="answers for the one-at-a-time reference path (0: all; default 64)",
    )
    p.add_argument("--warmup", type=int, default=16, help="warm-up answers per path, not counted (default 16)")
    p.add_argument("--parts", help="comma-separated parts (default: all of the config's)")
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["service", "offline", "reference"], help="paths to leave out"
    )
    p.add_argument("--seed", type=int, default=7, help="seed of the generated answers (default 7)")
    p.add_argument(
        "--rounds",
        type=_positive_int,
        default=1,
        help="service and offline paths this many times, alternated; medians reported (default 1)",
    )
    p.add_argument("--url", help="a running service of this config on loopback (default: start `l2grader serve`)")
    p.add_argument("--service-pid", type=int, help="with --url: its `l2grader serve` process, whose tree's CPU counts")
    p.add_argument("--api-key", help="bearer key (default: the first key of the config's api_keys_env variable)")
    p.add_argument("--out", help="folder for the service's log (default runs/bench)")
    p.add_argument(
        "--no-gpu", action="store_true", help="on a GPU host, run the reference on the config's model instead"
    )
    p.set_defaults(func=cmd_bench)
