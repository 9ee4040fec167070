"""An exam part's identity and what scoring it needs.

- :func:`model_id` is the one name of a part's version: the part and the
  content hash of its adapter (``interview@3f2a...``, ``interview@base``
  without one). Ray Serve routes by it, vLLM keys the adapter by it, results
  report it.
- :class:`Part` is a registered part: its config and its checked adapter
  (:func:`serve.grading.adapter_files.check_adapter`, done once per adapter version).
- :class:`PartSpec` is a part resolved against the model's tokenizer: the
  prompt and the label token ids the engine reads, and the calibration of its
  intervals (read from beside the adapter when the part is resolved).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from serve.grading import calibration
from serve.grading.adapter_files import AdapterFiles, check_adapter
from serve.grading.aspects import title
from serve.grading.candidate_calibration import CandidateIntervals, candidate_intervals
from serve.grading.config import GraderConfig, PartConfig, ReviewConfig
from serve.grading.fingerprint import aspect_fingerprint, base_hash, base_name, score_fingerprint
from serve.grading.levels import Level
from serve.grading.prompt import AspectRubric, build_aspect_prompt, build_prompt
from serve.grading.results import ModelInfo

logger = logging.getLogger(__name__)


class LabelTokenError(ValueError):
    """A label is not exactly one token of the model's tokenizer."""


def model_id(part: str, adapter_hash: str | None) -> str:
    """The name of a part's version: ``part@<adapter content hash>``, or ``part@base`` without an adapter."""
    return f"{part}@{adapter_hash or 'base'}"


@dataclass(frozen=True)
class Part:
    """A registered part: its config, its checked adapter (None: the base model) and its aspects' own adapters."""

    part: str
    config: PartConfig
    adapter: AdapterFiles | None
    aspect_adapters: tuple[tuple[str, AdapterFiles], ...] = ()

    @property
    def adapter_hash(self) -> str | None:
        return None if self.adapter is None else self.adapter.content_hash

    @property
    def model_id(self) -> str:
        return model_id(self.part, self.adapter_hash)


def check_part(part: str, pcfg: PartConfig, max_lora_rank: int | None = None) -> Part:
    """A part with its adapters checked (files, rank, content hash); ``AdapterError`` otherwise."""
    adapter = None if pcfg.adapter is None else check_adapter(pcfg.adapter, max_lora_rank)
    own = tuple(
        (name, check_adapter(a.adapter, max_lora_rank)) for name, a in pcfg.aspects.items() if a.adapter is not None
    )
    return Part(part, pcfg, adapter, own)


def config_parts(cfg: GraderConfig) -> dict[str, Part]:
    """Every part of a config, checked; fails at start-up on a bad adapter."""
    return {part: check_part(part, pcfg, cfg.engine.max_lora_rank) for part, pcfg in cfg.parts.items()}


@dataclass(frozen=True)
class AspectSpec:
    """What the engine needs to score one aspect of a part's answers: prompt, labels, adapter.

    It has the names :class:`PartSpec` has for the same things, so one request builder serves both.
    """

    part: str
    aspect: str
    model_id: str  # the vLLM adapter name: the part's model id when the part's adapter scores the aspect
    levels: tuple[Level, ...]
    prompt: str
    label_token_ids: tuple[int, ...]
    adapter_path: Path | None
    adapter_hash: str | None
    prompt_token_ids: tuple[int, ...] = ()  # the prompt tokenized once, so the engine need not for every request
    intervals: calibration.Intervals = calibration.Intervals()
    validated: bool = False

    @property
    def adapter_int_id(self) -> int:
        return 0 if self.adapter_hash is None else int(self.adapter_hash[:7], 16) + 1

    @property
    def adapter_name(self) -> str | None:
        """The adapter as answers name it (None: the base model)."""
        return None if self.adapter_hash is None else self.model_id


@dataclass(frozen=True)
class PartSpec:
    """Everything the engine needs to score answers to one part (and its aspects)."""

    part: str
    model_id: str
    levels: tuple[Level, ...]
    prompt: str
    label_token_ids: tuple[int, ...]
    adapter_path: Path | None
    adapter_hash: str | None
    model: ModelInfo
    review: ReviewConfig
    intervals: calibration.Intervals = calibration.Intervals()
    aspects: tuple[AspectSpec, ...] = ()
    prompt_token_ids: tuple[int, ...] = ()  # the prompt tokenized once, so the engine need not for every request

    @property
    def adapter_int_id(self) -> int:
        """Positive integer id derived from the content hash (vLLM keys adapters by it)."""
        return 0 if self.adapter_hash is None else int(self.adapter_hash[:7], 16) + 1

    @property
    def targets(self) -> tuple[PartSpec | AspectSpec, ...]:
        """What one chunk is scored for: the holistic score, then each aspect."""
        return (self, *self.aspects)


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


def prompt_tokens(tokenizer, prompt: str) -> tuple[int, ...]:
    """A prompt's token ids as the engine would make them of its text (no special tokens added)."""
    return tuple(tokenizer.encode(prompt, add_special_tokens=False))


def aspect_rubrics(pcfg: PartConfig) -> tuple[AspectRubric, ...]:
    """The part's aspects as its prompt shows them."""
    return tuple(AspectRubric(title(name), a.description, a.levels) for name, a in pcfg.aspects.items())


def aspect_prompt(pcfg: PartConfig, name: str) -> str:
    """The prompt of one of the part's aspects."""
    return build_aspect_prompt(pcfg.task, pcfg.levels, dict(zip(pcfg.aspects, aspect_rubrics(pcfg)))[name])


def aspect_fingerprints(part: Part, cfg: GraderConfig) -> dict[str, dict[str, str]]:
    """What each of the part's aspect scores depends on under ``cfg`` (its calibration's key)."""
    own, fp = dict(part.aspect_adapters), part_fingerprint(part, cfg)
    out = {}
    for name, a in part.config.aspects.items():
        files = own.get(name, part.adapter)
        prompt = aspect_prompt(part.config, name)
        out[name] = aspect_fingerprint(fp, prompt, a.levels, None if files is None else files.content_hash)
    return out


def resolve_aspects(
    part: Part, tokenizer, intervals: calibration.Intervals, fingerprints: dict[str, dict[str, str]]
) -> tuple[AspectSpec, ...]:
    """The part's aspects resolved against the tokenizer, each scored by its own adapter or else the part's, each
    with its interval and validation from the part's calibration (``intervals``: the part's; ``fingerprints``:
    :func:`aspect_fingerprints`). With ``withhold_unvalidated_aspects``, an aspect without validation evidence is
    not scored at all."""
    pcfg, own = part.config, dict(part.aspect_adapters)
    specs = []
    for name, a in pcfg.aspects.items():
        files = own.get(name, part.adapter)
        spec_id = part.model_id if name not in own else model_id(f"{part.part}.{name}", files.content_hash)
        prompt = aspect_prompt(pcfg, name)
        adapter_hash = None if files is None else files.content_hash
        state = calibration.aspect_state(intervals.state, name, fingerprints[name])
        validated = state.calibration is not None and state.calibration.validation.validated
        if not validated and pcfg.withhold_unvalidated_aspects:
            logger.info("part %s: aspect %s withheld: no validation evidence (%s)", part.part, name, state.detail)
            continue
        specs.append(
            AspectSpec(
                part=part.part,
                aspect=name,
                model_id=spec_id,
                levels=a.levels,
                prompt=prompt,
                prompt_token_ids=prompt_tokens(tokenizer, prompt),
                label_token_ids=label_token_ids(tokenizer, a.levels),
                adapter_path=None if files is None else files.path,
                adapter_hash=adapter_hash,
                intervals=calibration.Intervals(state, intervals.coverage, intervals.method),
                validated=validated,
            )
        )
    return tuple(specs)


class CalibrationRequiredError(ValueError):
    """A part whose config requires a calibration (``interval.require``) has no valid one: it is not served."""


def part_fingerprint(part: Part, cfg: GraderConfig) -> dict[str, str]:
    """What the part's holistic scores depend on under ``cfg`` (:mod:`serve.grading.fingerprint`)."""
    return score_fingerprint(part.config, part.adapter_hash, base=cfg.model.base, audio=cfg.audio, engine=cfg.engine)


def part_intervals(part: Part, cfg: GraderConfig, *, log: bool = True) -> calibration.Intervals:
    """How the part's answers get their interval: its calibration checked against the fingerprint of what it serves
    now. Why a calibration is not used is logged; ``interval.require`` turns that into
    :class:`CalibrationRequiredError`."""
    pcfg = part.config
    state = calibration.load(None if part.adapter is None else part.adapter.path, part_fingerprint(part, cfg))
    if state.calibration is None:
        if pcfg.interval.require:
            raise CalibrationRequiredError(
                f"part {part.part!r} requires a valid calibration (interval.require) and has none: "
                f"{state.status}: {state.detail}"
            )
        if log:
            say = logger.warning if state.status != "uncalibrated" else logger.info
            say("part %s: answers carry no interval: %s: %s", part.part, state.status, state.detail)
    elif log:
        logger.info(
            "part %s: intervals from %s (%s, %.0f %%)",
            part.part,
            state.detail,
            pcfg.interval.method,
            100 * pcfg.interval.coverage,
        )
    return calibration.Intervals(state, pcfg.interval.coverage, pcfg.interval.method)


def candidate_intervals_of(cfg: GraderConfig, parts: Mapping[str, Part], *, log: bool = False) -> CandidateIntervals:
    """How candidates' overall results get their interval: the config's candidate calibration (``candidate.
    calibration``), checked against the rule and the fingerprints of the registered ``parts`` as they serve now;
    every door passes it to :func:`serve.grading.answers.candidate_result`."""
    got = candidate_intervals(cfg.candidate, {name: part_fingerprint(p, cfg) for name, p in parts.items()})
    if log and cfg.candidate.calibration is not None:
        say = logger.info if got.state.calibration is not None else logger.warning
        say("candidates' overall interval: %s: %s", got.state.status, got.state.detail)
    return got


def resolve_part(part: Part, tokenizer, cfg: GraderConfig) -> PartSpec:
    """A checked part resolved against the tokenizer (its labels must be single tokens) and its calibration."""
    pcfg = part.config
    prompt = build_prompt(pcfg.task, pcfg.levels)
    base = cfg.model.base
    intervals = part_intervals(part, cfg)
    return PartSpec(
        part=part.part,
        model_id=part.model_id,
        levels=pcfg.levels,
        prompt=prompt,
        prompt_token_ids=prompt_tokens(tokenizer, prompt),
        label_token_ids=label_token_ids(tokenizer, pcfg.levels),
        adapter_path=None if part.adapter is None else part.adapter.path,
        adapter_hash=part.adapter_hash,
        model=ModelInfo(
            base=base_name(base),
            base_hash=base_hash(base),
            adapter=None if part.adapter is None else part.model_id,
            adapter_hash=part.adapter_hash,
            untrained=cfg.model.untrained,
        ),
        review=pcfg.review,
        intervals=intervals,
        aspects=resolve_aspects(part, tokenizer, intervals, aspect_fingerprints(part, cfg)),
    )


def resolve_parts(cfg: GraderConfig, tokenizer) -> dict[str, PartSpec]:
    """Check and resolve every configured part; fails at start-up on a bad label or adapter."""
    return {name: resolve_part(part, tokenizer, cfg) for name, part in config_parts(cfg).items()}
