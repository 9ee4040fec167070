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
from serve.grading.parts import PartSpec, resolve_parts
from serve.grading.results import ScoredAnswer
from serve.grading.scoring import ChunkScore, aggregate, label_distribution

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
        for spec in self.parts.values():
            if spec.adapter_path is None:
                continue
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(model, str(spec.adapter_path), adapter_name=spec.part)
            else:
                self.model.load_adapter(str(spec.adapter_path), adapter_name=spec.part)
        self.model.eval()

    @torch.inference_mode()
    def label_logprobs(self, spec: PartSpec, chunk: Chunk) -> np.ndarray:
        """Log-probabilities (over the whole vocabulary) of the part's labels at the first output position."""
        inputs = processor_inputs(self.processor, spec.prompt, [chunk.samples], self.device)
        if spec.adapter_path is None:
            ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()
        else:
            self.model.set_adapter(spec.part)
            ctx = nullcontext()
        with ctx:
            logits = self.model(**inputs).logits[0, -1].float()
        return torch.log_softmax(logits, dim=-1)[list(spec.label_token_ids)].cpu().numpy()

    def score_answer(self, part: str, chunks: Sequence[Chunk]) -> ScoredAnswer:
        """Score one answer, chunk by chunk (label mass included, as the engine reports it)."""
        spec = self.parts[part]
        scores = [ChunkScore(c.start_s, c.end_s, *label_distribution(self.label_logprobs(spec, c))) for c in chunks]
        return aggregate(part, spec.levels, scores, spec.model, spec.intervals)
