"""Reference scorer: plain transformers + peft, one forward pass per chunk.

The same prompt, label tokens, chunking and score arithmetic as the vLLM path,
computed the way a research grader runs (one answer at a time, no batching
across requests). Tests use it to prove the vLLM path computes the same
numbers; the benchmark uses it as the slow baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from serve.grading.audio import SAMPLE_RATE, Chunk
from serve.grading.config import GraderConfig
from serve.grading.parts import AspectSpec, PartSpec, resolve_parts
from serve.grading.results import ScoredAnswer
from serve.grading.scoring import ChunkScore, aggregate, aspect_score, label_distribution

#: Names of the dtypes in configs and on the command line.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def processor_inputs(
    processor, prompt: str, audios: Sequence[np.ndarray], device: str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Model inputs for chunks of one prompt (right-padded), the processor called as vLLM calls it.

    Floating-point inputs (the audio features) are cast to ``dtype`` when given.
    """
    inputs = processor(
        text=[prompt] * len(audios),
        audio=list(audios),
        sampling_rate=SAMPLE_RATE,
        truncation=True,
        padding=True,
        return_tensors="pt",
    )
    out = {}
    for k, v in inputs.items():
        v = v.to(device)
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def load_base_model(base: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Qwen2-Audio and its processor from a hub id or folder (published layout)."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(base)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(base, dtype=dtype).to(device).eval()
    return model, processor


class ReferenceScorer:
    """Scores answers with transformers + peft, every configured adapter loaded under its part's name."""

    def __init__(self, cfg: GraderConfig, device: str = "cpu", dtype: str | None = None):
        from peft import PeftModel

        dtype = dtype or (cfg.engine.dtype if cfg.engine.dtype != "auto" else "float32")
        self.cfg, self.device = cfg, device
        model, self.processor = load_base_model(cfg.model.base, TORCH_DTYPES[dtype], device)
        self.parts: dict[str, PartSpec] = resolve_parts(cfg, self.processor.tokenizer)
        self.model = model
        loaded = set()
        for target in (t for spec in self.parts.values() for t in spec.targets):
            if target.adapter_path is None or adapter_name(target) in loaded:
                continue
            loaded.add(adapter_name(target))
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(
                    model, str(target.adapter_path), adapter_name=adapter_name(target)
                )
            else:
                self.model.load_adapter(str(target.adapter_path), adapter_name=adapter_name(target))
        self.model.eval()

    @torch.inference_mode()
    def label_logprobs(self, spec: PartSpec | AspectSpec, chunk: Chunk) -> np.ndarray:
        """Log-probabilities (over the whole vocabulary) of the labels of a part (or one of its aspects) at the first
        output position."""
        inputs = processor_inputs(self.processor, spec.prompt, [chunk.samples], self.device)
        if spec.adapter_path is None:
            ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()
        else:
            self.model.set_adapter(adapter_name(spec))
            ctx = nullcontext()
        with ctx:
            logits = self.model(**inputs).logits[0, -1].float()
        return torch.log_softmax(logits, dim=-1)[list(spec.label_token_ids)].cpu().numpy()

    def chunk_scores(self, spec: PartSpec | AspectSpec, chunks: Sequence[Chunk]) -> list[ChunkScore]:
        return [ChunkScore(c.start_s, c.end_s, *label_distribution(self.label_logprobs(spec, c))) for c in chunks]

    def score_answer(self, part: str, chunks: Sequence[Chunk]) -> ScoredAnswer:
        """Score one answer, chunk by chunk, and each of its part's aspects (label mass included, as the engine
        reports it)."""
        spec = self.parts[part]
        answer = aggregate(part, spec.levels, self.chunk_scores(spec, chunks), spec.model, spec.intervals)
        answer.aspects = {
            a.aspect: aspect_score(a.levels, self.chunk_scores(a, chunks), a.adapter_name) for a in spec.aspects
        }
        return answer


def adapter_name(target: PartSpec | AspectSpec) -> str:
    """The peft adapter name of a target's adapter (its content hash: peft names may not hold '.')."""
    return f"adapter_{target.adapter_hash}"
