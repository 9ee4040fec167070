"""Each configured exam part resolved against the tokenizer: prompt, label token ids, adapter identity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters.lora import adapter_hash, adapter_rank, check_adapter_dir
from serve.config import GraderConfig, PartConfig
from serve.levels import Level
from serve.prompt import build_prompt
from serve.protocol import ModelInfo


class LabelTokenError(ValueError):
    """A label is not exactly one token of the model's tokenizer."""


@dataclass(frozen=True)
class PartSpec:
    """Everything needed to score answers to one part."""

    part: str
    levels: tuple[Level, ...]
    prompt: str
    label_token_ids: tuple[int, ...]
    adapter_path: Path | None
    adapter_hash: str | None
    model: ModelInfo

    @property
    def adapter_name(self) -> str | None:
        """Name the engine knows the adapter by: part and content hash, so a replaced adapter is a new name."""
        return self.model.adapter

    @property
    def adapter_int_id(self) -> int:
        """Positive integer id derived from the content hash (vLLM keys adapters by it)."""
        return 0 if self.adapter_hash is None else int(self.adapter_hash[:7], 16) + 1


def label_token_ids(tokenizer, levels: tuple[Level, ...]) -> tuple[int, ...]:
    """The token id of each label; :class:`LabelTokenError` unless each label is one distinct token."""
    ids = []
    for lv in levels:
        toks = tokenizer.encode(lv.label, add_special_tokens=False)
        if len(toks) != 1:
            raise LabelTokenError(
                f"label {lv.label!r} ({lv.cefr}) is {len(toks)} tokens {toks} in this tokenizer; "
                "every label must be a single token"
            )
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise LabelTokenError(f"labels {[lv.label for lv in levels]} do not map to distinct tokens: {ids}")
    return tuple(ids)


def resolve_part(
    part: str, pcfg: PartConfig, tokenizer, *, base: str, untrained: bool, max_lora_rank: int | None = None
) -> PartSpec:
    """Check and resolve one part (label tokens, adapter files and rank)."""
    adapter_digest = None
    if pcfg.adapter is not None:
        check_adapter_dir(pcfg.adapter)
        rank = adapter_rank(pcfg.adapter)
        if max_lora_rank is not None and rank > max_lora_rank:
            raise ValueError(f"part {part!r}: adapter rank {rank} exceeds engine.max_lora_rank {max_lora_rank}")
        adapter_digest = adapter_hash(pcfg.adapter)
    return PartSpec(
        part=part,
        levels=pcfg.levels,
        prompt=build_prompt(pcfg.task, pcfg.levels),
        label_token_ids=label_token_ids(tokenizer, pcfg.levels),
        adapter_path=pcfg.adapter,
        adapter_hash=adapter_digest,
        model=ModelInfo(
            base=base,
            adapter=None if adapter_digest is None else f"{part}@{adapter_digest}",
            adapter_hash=adapter_digest,
            untrained=untrained,
        ),
    )


def resolve_parts(cfg: GraderConfig, tokenizer) -> dict[str, PartSpec]:
    """Resolve every configured part; fails at start-up on a bad label or adapter."""
    return {
        part: resolve_part(
            part,
            pcfg,
            tokenizer,
            base=cfg.model.base,
            untrained=cfg.model.untrained,
            max_lora_rank=cfg.engine.max_lora_rank,
        )
        for part, pcfg in cfg.parts.items()
    }
