"""vLLM requests of the grader: engine settings, one prefill per chunk, label log-probabilities out.

Each chunk is one request per target (the holistic score, then each of the
part's aspects) with ``max_tokens=1`` that asks for the
log-probabilities of exactly the part's label tokens (vLLM's
``logprob_token_ids``, raw mode: over the whole vocabulary, before any
sampling restriction). They are renormalised over the labels here
(:func:`serve.grading.scoring.label_distribution`), which also gives the label
mass: the probability the model puts on the label set at all. Requests carry their part's LoRA
adapter, named by the part's model id; vLLM loads it on first use and batches
requests of different adapters together.

An aspect's prompt is the holistic prompt up to the end of the audio, then the
aspect's question (:func:`serve.grading.prompt.build_aspect_prompt`). The
requests of one chunk carry the same audio array, so vLLM processes and hashes
it once (its processor cache, ``engine.audio_cache_gb``), encodes it once (its
encoder cache, keyed by that hash) and, where the part's adapter scores the
aspect, prefills the rubric and the audio once (its prefix cache, keyed by the
tokens, the audio's hash and the adapter): each aspect adds a short suffix.

The offline (:mod:`serve.engine.offline`) and online
(:mod:`serve.engine.online`) engines build their requests, check parts and
resend failed requests (:func:`needs_resend`) here.
"""

from __future__ import annotations

import json
import logging.config
import os
from pathlib import Path
from typing import Any

from serve.grading.adapter_files import check_lora_dims
from serve.grading.audio import SAMPLE_RATE, Chunk
from serve.grading.config import GraderConfig
from serve.grading.parts import AspectSpec, Part, PartSpec, resolve_part
from serve.grading.scoring import ChunkScore, label_distribution


def configure_vllm_environment() -> None:
    """Process-wide vLLM settings; call before importing vllm.

    Logs go to stderr so that stdout carries only results.
    """
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def vllm_logs_to_file(path: Path) -> None:
    """Send vLLM's log, this process's and its engine process's, to ``path`` (appended) instead of the terminal.

    Call before importing vllm: it reads ``VLLM_LOGGING_CONFIG_PATH`` (a :func:`logging.config.dictConfig`
    file, written beside the log) at import."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": {"format": "%(asctime)s %(levelname)s %(name)s %(process)d: %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path), "formatter": "line"}},
        "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}},
    }
    config_path = path.with_suffix(".logging.json")
    config_path.write_text(json.dumps(config))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_path)  # the engine process, and vllm once imported
    logging.config.dictConfig(config)  # this process's lines logged while vllm is imported


def engine_kwargs(cfg: GraderConfig) -> dict[str, Any]:
    """vLLM engine arguments for a config (shared by ``LLM`` and ``AsyncLLM``)."""
    e = cfg.engine
    return dict(
        model=cfg.model.base,
        dtype=e.dtype,
        seed=e.seed,
        max_model_len=e.max_model_len,
        max_num_seqs=e.max_num_seqs,
        gpu_memory_utilization=e.memory_share,
        tensor_parallel_size=e.tensor_parallel_size,
        enforce_eager=e.enforce_eager,
        enable_lora=True,
        max_lora_rank=e.max_lora_rank,
        max_loras=e.max_loras,
        max_cpu_loras=e.max_cpu_loras,
        limit_mm_per_prompt={"audio": 1},
        logprobs_mode="raw_logprobs",
        enable_prefix_caching=True,
        mm_processor_cache_gb=e.audio_cache_gb,
        **({"block_size": e.kv_block_size} if e.kv_block_size else {}),
    )


Target = PartSpec | AspectSpec


def sampling_params(spec: Target):
    """One output position, returning every label's full-vocabulary log-probability.

    Nothing is detokenized: the score reads token ids and log-probabilities only (:func:`chunk_score`), and
    turning the sampled token and each label's logprob back into text cost about 1 ms of CPU per answer."""
    from vllm import SamplingParams  # vLLM loads only in an engine's process, after configure_vllm_environment

    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        logprobs=len(spec.label_token_ids),
        logprob_token_ids=list(spec.label_token_ids),
        detokenize=False,
    )


def lora_request(spec: Target):
    """The part's adapter as a vLLM ``LoRARequest`` named by its model id (None for the base model)."""
    if spec.adapter_path is None:
        return None
    from vllm.lora.request import LoRARequest  # as above

    return LoRARequest(lora_name=spec.model_id, lora_int_id=spec.adapter_int_id, lora_path=str(spec.adapter_path))


def engine_input(spec: Target, chunk: Chunk) -> dict[str, Any]:
    """The prompt (its token ids, tokenized once when the part was resolved) and audio of one chunk, as vLLM takes
    them (audio already 16 kHz mono)."""
    audio = {"audio": (chunk.samples, SAMPLE_RATE)}
    if spec.prompt_token_ids:
        return {"prompt_token_ids": list(spec.prompt_token_ids), "multi_modal_data": audio}
    return {"prompt": spec.prompt, "multi_modal_data": audio}


def chunk_score(spec: Target, chunk: Chunk, output) -> ChunkScore:
    """Read the label distribution and label mass of a finished request (a vLLM ``RequestOutput``)."""
    completion = output.outputs[0]
    if not completion.logprobs:
        raise RuntimeError(f"engine returned no logprobs for a chunk of part {spec.part!r} ({target_name(spec)})")
    by_id = completion.logprobs[0]  # token id -> Logprob (the labels and the sampled token), not in label order
    missing = [tid for tid in spec.label_token_ids if tid not in by_id]
    if missing:
        raise RuntimeError(f"engine returned no logprob for label token ids {missing}")
    lps = [by_id[tid].logprob for tid in spec.label_token_ids]
    probabilities, mass = label_distribution(lps)
    return ChunkScore(chunk.start_s, chunk.end_s, probabilities, mass)


#: Times a request is sent again after vLLM finished it with ``finish_reason == "error"``: its engine process lacked
#: the audio its front end had cached (the two processor caches drifted apart), which a fresh send, rendered again,
#: does not meet. A request that fails again is an error of its answer.
RESENDS = 1


def needs_resend(output) -> bool:
    """Whether vLLM finished a request (a ``RequestOutput``) with the retryable ``error`` finish (:data:`RESENDS`)."""
    return output.outputs[0].finish_reason == "error"


def target_name(spec: Target) -> str:
    """``holistic`` or the aspect's id (request ids, messages)."""
    return getattr(spec, "aspect", "holistic")


def adapters_of(spec: PartSpec) -> list[Target]:
    """The targets whose adapters the engine must hold to score the part: one per distinct adapter."""
    seen: dict[str, Target] = {}
    for t in spec.targets:
        if t.adapter_path is not None:
            seen.setdefault(t.model_id, t)
    return list(seen.values())


#: Audio tokens Qwen2-Audio makes of 30 s (16 kHz -> 3000 mel frames -> 1500 encoder frames -> 750 after pooling).
AUDIO_TOKENS_PER_30_S = 750


def check_prompt_fits(spec: PartSpec, tokenizer, cfg: GraderConfig) -> None:
    """``ValueError`` unless each of the part's prompts (holistic, aspects) with its longest chunk's audio and one
    label fits ``max_model_len``."""
    audio_tokens = -(-AUDIO_TOKENS_PER_30_S * cfg.audio.max_chunk_s // 30)
    for target in spec.targets:
        need = len(tokenizer.encode(target.prompt, add_special_tokens=False)) - 1 + int(audio_tokens) + 1
        if need > cfg.engine.max_model_len:
            raise ValueError(
                f"part {spec.part!r} ({target_name(target)}): the prompt with {cfg.audio.max_chunk_s:g} s of audio "
                f"needs {need} tokens, more than engine.max_model_len {cfg.engine.max_model_len} "
                "(shorten the task text or the descriptors)"
            )


def check_part(part: Part, tokenizer, cfg: GraderConfig, hf_config) -> PartSpec:
    """The part resolved, and ``ValueError`` unless its prompts fit the context and its LoRA matrices the model."""
    spec = resolve_part(part, tokenizer, cfg)
    check_prompt_fits(spec, tokenizer, cfg)
    dims = model_dims(hf_config)
    for files in (part.adapter, *(f for _, f in part.aspect_adapters)):
        if files is not None:
            check_lora_dims(files, dims)
    return spec


def model_dims(hf_config) -> dict[str, int]:
    """The language model's feature sizes LoRA matrices must match (hidden, q, kv, ffn)."""
    text = getattr(hf_config, "text_config", hf_config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return {"hidden": text.hidden_size, "q": heads * head_dim, "kv": kv_heads * head_dim, "ffn": text.intermediate_size}
