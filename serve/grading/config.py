"""The grader's YAML config, validated by pydantic.

One file names the base model, the engine settings and the exam parts. Paths
in it (base model, adapters) are resolved against the file's own folder, so a
config and the models beside it can move together.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve.grading.aspects import BUILTIN_ASPECTS, MAX_ASPECTS
from serve.grading.levels import DEFAULT_LEVELS, Level
from serve.grading.prompt import DEFAULT_TASK

# vLLM accepts only these LoRA ranks.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


#: Longest part id: ids are metric labels, log fields and URL segments.
MAX_PART_ID = 64
PART_ID_CHARS = f"1-{MAX_PART_ID} letters, digits, '-', '_' or '.'"
#: Most levels a part may have: the engine reads the label tokens' log-probabilities, and vLLM returns at most 20.
MAX_LEVELS = 20


def clip(text: object, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (with a mark), for logs and messages that echo what a client sent."""
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit]}...[{len(s)} chars]"


def validate_part_id(part: str, what: str = "part id") -> str:
    """The one rule for part (and aspect) ids, config keys, URL paths and metric labels: ``ValueError`` unless it is
    1-64 letters, digits, ``-_.``."""
    if not part or len(part) > MAX_PART_ID or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in part):
        raise ValueError(f"{what} {clip(part, MAX_PART_ID)!r} must be {PART_ID_CHARS}")
    return part


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate nearest to ``name`` (a likely typo of it, by difflib's ratio), or None when none is near."""
    near = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return near[0] if near else None


def known_keys(model: type[BaseModel] | None, loc: Iterable[Any]) -> list[str]:
    """The keys the model accepts at ``loc`` (the path of a mapping in it; dict keys and list indexes skipped)."""
    node: Any = model
    for step in loc:
        while typing.get_origin(node) in (typing.Union, types.UnionType):  # Optional[X] -> X
            node = next((a for a in typing.get_args(node) if a is not type(None)), None)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(step))
            node = field.annotation if field is not None else None
        elif typing.get_origin(node) in (dict, list, tuple, Mapping):
            node = typing.get_args(node)[-1] if typing.get_args(node) else None
        else:
            return []
    while typing.get_origin(node) in (typing.Union, types.UnionType):
        node = next((a for a in typing.get_args(node) if a is not type(None)), None)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


#: Keys that moved to another section of the file: where they are now.
MOVED_KEYS = {
    f"audio.{name}": f"serving.{name}"
    for name in ("max_unsized_body_mb", "max_batch_answers", "max_batch_audio_s", "max_batch_upload_mb")
}


def describe_error(err: Mapping[str, Any], root: str, model: type[BaseModel] | None = None) -> str:
    """One validation error as ``where: what`` in plain words; an unknown key names the nearest known one."""
    loc = tuple(err["loc"])
    where = ".".join(str(x) for x in loc) or root
    if err["type"] == "extra_forbidden" and where in MOVED_KEYS:
        return f"{where}: moved to {MOVED_KEYS[where]}"
    if err["type"] == "extra_forbidden":
        near = closest(str(loc[-1]), known_keys(model, loc[:-1]))
        return f"{where}: unknown key" + (f" (did you mean {near!r}?)" if near else "")
    if err["type"] == "missing":
        return f"{where}: required, but missing"
    return f"{where}: {err['msg']}"


def format_validation_errors(
    errors: Iterable[Mapping[str, Any]], root: str = "body", model: type[BaseModel] | None = None
) -> str:
    """pydantic's (or FastAPI's) error list as one line: ``loc.path: message; ...``."""
    return "; ".join(describe_error(err, root, model) for err in errors)


def yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what, in one line, from PyYAML's multi-line message."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


class ConfigError(ValueError):
    """The config file is missing, not YAML, or does not validate (message says where and why)."""


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping of the YAML names one key twice (PyYAML would keep the last silently)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that names a key twice (YAML requires keys to be unique; PyYAML
    keeps the last value, so a second ``serving:`` section would silently replace the first).

    Keys a merge (``<<: *anchor``) brings in may be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKeyError(
                        None,
                        None,
                        f"key {clip(key)!r} appears twice in one mapping (lines {first[key]} and {line})",
                        key_node.start_mark,
                    )
                first[key] = line
        return super().construct_mapping(node, deep=deep)


class StrictModel(BaseModel):
    """A config section that refuses unknown keys (so a typo is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid")


class ModelConfig(StrictModel):
    """The base model."""

    base: str = Field(description="Hub id (e.g. Qwen/Qwen2-Audio-7B-Instruct) or a local checkpoint folder.")
    untrained: bool = Field(
        False, description="True for the generated tiny checkpoint: results are flagged as meaningless."
    )


class EngineConfig(StrictModel):
    """vLLM engine settings."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_lora_rank: int = Field(16, description="Largest adapter rank the engine accepts.")
    max_loras: int = Field(4, ge=1, description="Adapters resident on the device at once (in one batch).")
    max_cpu_loras: int = Field(16, ge=1, description="Adapters cached in host memory.")
    memory_share: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Share of device memory vLLM may use (on CPU: share reserved for the KV cache).",
    )
    max_num_seqs: int = Field(64, ge=1, description="Most sequences (audio chunks) batched together.")
    max_model_len: int = Field(2048, ge=256, description="Prompt tokens per chunk: rubric + up to 750 audio tokens.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / compilation (faster start, slower steps).")
    audio_cache_gb: float = Field(
        0.1,
        ge=0,
        description="vLLM's cache of processed audio inputs (mm_processor_cache_gb), in the engine's "
        "front and core processes each (LRU). The requests of an answer's aspects find its audio here instead of "
        "processing it again; answers are all different, so a larger cache only grows (vLLM's default of 4 GiB "
        "made the engine core grow by 2.6 GB over a 5,000-answer session). 0 turns it off.",
    )
    kv_block_size: int | None = Field(
        None,
        ge=16,
        multiple_of=16,
        description="Tokens per KV-cache block (null: vLLM's default, 16 on GPU, 128 on CPU). The prefix cache "
        "reuses whole blocks only, so an aspect's request recomputes the audio's last, partial block: smaller "
        "blocks make aspects cheaper.",
    )
    tensor_parallel_size: int = Field(1, ge=1)
    seed: int = 0

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_known(cls, v: int) -> int:
        if v not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {list(VLLM_LORA_RANKS)} (vLLM's supported LoRA ranks)")
        return v

    @model_validator(mode="after")
    def _cpu_loras_cover_device(self) -> EngineConfig:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")
        return self


class AudioConfig(StrictModel):
    """Limits and rules for the audio of an answer."""

    max_chunk_s: float = Field(
        30.0, gt=0.0, le=30.0, description="Longest chunk sent to the encoder (its window is 30 s)."
    )
    min_speech_s: float = Field(1.0, ge=0.0, description="Less voiced audio than this is refused as silence/too short.")
    silence_dbfs: float = Field(
        -50.0, description="Frames quieter than this (RMS, dBFS) count as silence (speech_detector: loudness)."
    )
    speech_detector: Literal["silero_vad", "loudness"] = Field(
        "silero_vad",
        description="What tells speech from the rest: Silero VAD (a speech model on CPU) or the loudness rule "
        "(frames above silence_dbfs).",
    )
    vad_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Speech probability from which a frame is speech.")
    vad_threads: int = Field(1, ge=1, description="torch threads one answer's speech detection may use.")
    cut_off_db: float = Field(
        14.0,
        ge=0.0,
        description="An answer whose speech runs into its end and whose last 20 ms are within this many dB of its "
        "speech level was cut off mid-word (quality.ends_in_speech; review reason cut_off). A finished word falls "
        "towards silence first. docs/trust.md measures it (l2grader bench-cutoff).",
    )
    cut_at_pauses: bool = Field(
        True, description="Cut answers longer than max_chunk_s in the longest pauses in reach of the balanced points."
    )
    pause_search_s: float = Field(
        4.0,
        ge=0.0,
        description="How far a chunk boundary may move from its balanced point to fall in a pause: each chunk lasts "
        "the balanced length give or take twice this (0: balanced cuts).",
    )
    min_pause_s: float = Field(
        0.25, ge=0.0, description="Shortest run without speech a chunk boundary is put in (shorter dips are speech)."
    )
    max_extra_chunks: int = Field(
        1,
        ge=0,
        le=8,
        description="Chunks an answer may be cut into beyond the fewest, where that puts fewer boundaries in speech "
        "(an answer of 60 s fits two 30 s chunks only if cut at 30.0 s). Each is one more engine request: the "
        "answer's audio is the same, the per-request overhead grows (0: the fewest chunks always).",
    )
    max_duration_s: float = Field(900.0, gt=0.0, description="Longest answer accepted.")
    max_upload_mb: float = Field(50.0, gt=0.0, description="Largest upload accepted.")
    max_input_samples_per_s: float = Field(
        96000.0,
        gt=0.0,
        description="Input samples (rate x channels) decoded per second of max_duration_s at most: bounds the "
        "decoding work of one answer (default: 48 kHz stereo).",
    )

    def max_input_samples(self) -> int:
        """The input samples one answer may hold: :attr:`max_input_samples_per_s` x :attr:`max_duration_s`."""
        return int(self.max_input_samples_per_s * self.max_duration_s)


class ReviewConfig(StrictModel):
    """When an answer's score goes to a human examiner: one threshold per reason code; null turns a check off.

    Defaults come from ``l2grader evaluate`` on the degraded synthetic test (README, "Which scores to trust"):
    they send every noisy, clipped and gapped answer there to review and 6 % of the clean ones.
    """

    min_snr_db: float | None = Field(15.0, description="low_snr: estimated SNR below this (dB).")
    max_clipped_fraction: float | None = Field(
        0.001, ge=0.0, le=1.0, description="clipping: more than this share of samples at full scale."
    )
    min_speech_ratio: float | None = Field(
        0.4, ge=0.0, le=1.0, description="low_speech_ratio: less than this share of the answer is speech."
    )
    max_score_sd: float | None = Field(
        1.1, ge=0.0, description="uncertain: the score's standard deviation under the label distribution above this."
    )
    min_label_mass: float | None = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="low_label_mass: less probability than this on the label set at all "
        "(the scale depends on the model: raise it per part after evaluating).",
    )
    max_chunk_spread: float | None = Field(
        1.5, ge=0.0, description="chunks_disagree: highest minus lowest chunk score above this (answers over 30 s)."
    )
    max_interval_width: float | None = Field(
        2.0,
        ge=0.0,
        description="wide_interval: the calibrated interval, before clipping to the scale, is wider than this (in "
        "scale points, 1 = one CEFR level).",
    )
    min_duration_s: float | None = Field(
        None, ge=0.0, description="too_short: the answer lasts less than this (the part's expected range)."
    )
    max_duration_s: float | None = Field(
        None, ge=0.0, description="too_long: the answer lasts more than this (the part's expected range)."
    )
    cut_off: bool = Field(
        True,
        description="cut_off: the answer ends mid-word, its speech running into its end at speech level "
        "(quality.ends_in_speech, by audio.cut_off_db).",
    )
    max_aspect_gap: float | None = Field(
        1.5,
        ge=0.0,
        description="aspects_disagree: the holistic score and the mean of the aspect scores differ by more than this "
        "(parts with aspects; each aspect's own score_sd and label mass are checked against max_score_sd and "
        "min_label_mass: aspect_uncertain, aspect_low_label_mass).",
    )


class IntervalConfig(StrictModel):
    """The calibrated score interval each answer carries (from calibration.json beside the part's adapter)."""

    coverage: float = Field(0.9, gt=0.0, lt=1.0, description="Nominal coverage of the interval.")
    method: Literal["mondrian", "scaled", "absolute"] = Field(
        "mondrian",
        description="mondrian: calibrated per predicted level, shifted where a level's scores are biased (the "
        "default, chosen on the worst bin); scaled: width grows with score_sd; absolute: one width for all answers "
        "(both hold on average only). docs/trust.md compares them.",
    )
    require: bool = Field(
        False,
        description="Refuse to serve the part (at start and at hot-load) without a valid calibration: fail closed.",
    )


class AspectConfig(StrictModel):
    """One analytic aspect of a part's answers (fluency, pronunciation, ...), scored beside the holistic score.

    The built-in aspects (:data:`serve.grading.aspects.BUILTIN_ASPECTS`) need no settings: their description
    and their descriptor per CEFR level are filled in on the part's labels. Other aspects name both.
    """

    description: str | None = Field(
        None,
        min_length=1,
        max_length=500,
        description="What the aspect judges, one sentence for the prompt (default: the built-in aspect's).",
    )
    levels: tuple[Level, ...] | None = Field(
        None,
        min_length=2,
        max_length=MAX_LEVELS,
        description="The aspect's labels and descriptors (default: the part's labels, with the built-in aspect's "
        "descriptor for each CEFR level).",
    )
    adapter: Path | None = Field(
        None,
        description="An adapter of its own (null: the part's adapter scores the aspect, and the aspect's requests "
        "reuse the holistic request's encoded audio and cached prefix).",
    )

    @field_validator("levels")
    @classmethod
    def _labels_unique(cls, v: tuple[Level, ...] | None) -> tuple[Level, ...] | None:
        labels = [lv.label for lv in v or ()]
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique, got {labels}")
        return v


def complete_aspect(name: str, aspect: AspectConfig, part_levels: tuple[Level, ...]) -> AspectConfig:
    """The aspect with its description and levels filled in from the built-ins (``ValueError`` if it has none)."""
    builtin = BUILTIN_ASPECTS.get(name)
    update: dict[str, Any] = {}
    if aspect.description is None:
        if builtin is None:
            raise ValueError(f"aspect {name!r} is not built in ({', '.join(BUILTIN_ASPECTS)}): give its description")
        update["description"] = builtin.description
    if aspect.levels is None:
        if builtin is None:
            raise ValueError(f"aspect {name!r} is not built in: give its levels")
        missing = [lv.cefr for lv in part_levels if lv.cefr not in builtin.descriptors]
        if missing:
            raise ValueError(f"aspect {name!r} has no built-in descriptor for {missing}: give its levels")
        update["levels"] = tuple(
            lv.model_copy(update={"descriptor": builtin.descriptors[lv.cefr]}) for lv in part_levels
        )
    return aspect.model_copy(update=update) if update else aspect


class PartConfig(StrictModel):
    """One exam part: its adapter, its prompt, its label scale, its aspects and its review thresholds."""

    adapter: Path | None = Field(None, description="peft LoRA adapter folder; null scores with the base model.")
    task: str = Field(
        DEFAULT_TASK, min_length=1, description="What the part asks of the candidate (goes in the prompt)."
    )
    levels: tuple[Level, ...] = Field(DEFAULT_LEVELS, min_length=2, max_length=MAX_LEVELS)
    review: ReviewConfig = Field(default_factory=ReviewConfig, description="When its scores go to a human examiner.")
    interval: IntervalConfig = Field(default_factory=IntervalConfig, description="Its answers' calibrated interval.")
    aspects: dict[str, AspectConfig] = Field(
        default_factory=dict,
        max_length=MAX_ASPECTS,
        description="Analytic aspects scored beside the holistic score, by id (a list of built-in ids will do: "
        f"{', '.join(BUILTIN_ASPECTS)}). None: the holistic score only.",
    )
    withhold_unvalidated_aspects: bool = Field(
        False,
        description="Score only the aspects whose calibration holds validation evidence (agreement with their own "
        "human scores, and added value over the holistic score); the others are not served at all.",
    )

    @field_validator("levels")
    @classmethod
    def _labels_unique(cls, v: tuple[Level, ...]) -> tuple[Level, ...]:
        labels = [lv.label for lv in v]
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique, got {labels}")
        return v

    @field_validator("aspects", mode="before")
    @classmethod
    def _aspect_list(cls, v: Any) -> Any:
        """``[fluency, coherence]`` is short for ``{fluency: {}, coherence: {}}``."""
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            if len(set(v)) != len(v):
                raise ValueError("aspects are listed more than once")
            return {name: {} for name in v}
        return v

    @model_validator(mode="after")
    def _complete_aspects(self) -> PartConfig:
        for name in self.aspects:
            validate_part_id(name, "aspect id")
        # In the order of their ids: the prompt lists them, and must not change when a config is rewritten.
        self.aspects = {name: complete_aspect(name, self.aspects[name], self.levels) for name in sorted(self.aspects)}
        return self


class CountAs(StrictModel):
    """An unscorable or missing part counts as this stated score (e.g. the scale's lowest)."""

    count_as: float = Field(description="The score the part counts as, on the overall scale.")


#: What an unscorable answer or a missing part does to the candidate's result: ``withhold`` it (no overall score,
#: with the reason), or count the part as a stated score (``{count_as: 1.0}``). Never a silent drop.
Rule = Literal["withhold"] | CountAs


def check_rule(v: Any) -> Any:
    """One clear message for a rule that is neither ``withhold`` nor ``{count_as: <score>}`` (never ``drop``)."""
    if v is None or v == "withhold" or isinstance(v, CountAs) or (isinstance(v, dict) and set(v) == {"count_as"}):
        return v
    raise ValueError(f"must be 'withhold' or {{count_as: <score>}}, got {clip(v)!r}")


class CandidatePart(StrictModel):
    """One part of the exam as the candidate's result counts it."""

    weight: float = Field(1.0, gt=0.0, description="Its weight in the overall score (weights are normalised).")
    required: bool = Field(True, description="A candidate without an answer to it is missing a part.")
    unscorable: Rule | None = Field(None, description="This part's own rule for an unscorable answer.")
    missing: Rule | None = Field(None, description="This part's own rule when the candidate has no answer to it.")

    _rules = field_validator("unscorable", "missing", mode="before")(check_rule)


class CutScore(StrictModel):
    """The lowest overall score of one level."""

    cefr: str = Field(min_length=1, description="The level, e.g. 'B1'.")
    min_score: float = Field(description="The lowest overall score at this level.")


class CandidateCalibrationConfig(StrictModel):
    """Where the candidate-level calibration lies and how it is served (``l2grader calibrate-candidates`` writes it;
    docs/trust.md, "The candidate's interval")."""

    path: Path = Field(description="The calibration file (relative: to the config file's folder).")
    coverage: float = Field(0.9, gt=0.0, lt=1.0, description="The overall interval's nominal coverage.")
    method: Literal["absolute", "mondrian"] = Field(
        "mondrian",
        description="absolute: score +- one quantile of |human - score|; mondrian: per predicted level, the "
        "two-sided quantiles of the signed error (as a part's intervals).",
    )


class CandidateConfig(StrictModel):
    """How a candidate's answers make their overall result (docs/usage.md, "The candidate's result").

    Answers of one part are averaged first, then the parts combined with their normalised weights. Absent,
    every part a candidate answered counts with weight 1, and an unscorable answer withholds the overall result.
    """

    parts: dict[str, CandidatePart] = Field(
        default_factory=dict,
        description="The exam's parts, by id (empty: every part the candidate answered, weight 1, none required). "
        "Answers of parts not listed are shown in the result but do not count.",
    )
    unscorable: Rule = Field("withhold", description="What an unscorable answer does (withhold, or {count_as: x}).")
    missing: Rule = Field("withhold", description="What a required part without an answer does.")
    cuts: tuple[CutScore, ...] | None = Field(
        None,
        description="The cut-score table: each level above the lowest with its lowest overall score, ascending. "
        "None: the midpoints between the scale's level scores (the level nearest the score).",
    )
    interval_coverage: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Give no overall interval when its guaranteed coverage (1 - the answers' miscoverages summed) "
        "is below this.",
    )
    calibration: CandidateCalibrationConfig | None = Field(
        None,
        description="A candidate-level calibration from candidates' human overall scores: while it is fresh, the "
        "overall interval comes from it instead of the parts' combined intervals.",
    )

    _rules = field_validator("unscorable", "missing", mode="before")(check_rule)

    @field_validator("parts")
    @classmethod
    def _ids(cls, v: dict[str, CandidatePart]) -> dict[str, CandidatePart]:
        for part in v:
            validate_part_id(part)
        return v

    @field_validator("cuts")
    @classmethod
    def _ascending(cls, v: tuple[CutScore, ...] | None) -> tuple[CutScore, ...] | None:
        if v is not None:
            scores = [c.min_score for c in v]
            if not v or scores != sorted(scores) or len(set(scores)) != len(scores):
                raise ValueError(f"cut scores must be at least one, strictly ascending, got {scores}")
            if len({c.cefr for c in v}) != len(v):
                raise ValueError("each level has one cut score")
        return v

    def unscorable_rule(self, part: str) -> Rule:
        own = self.parts.get(part)
        return own.unscorable if own is not None and own.unscorable is not None else self.unscorable

    def missing_rule(self, part: str) -> Rule:
        own = self.parts.get(part)
        return own.missing if own is not None and own.missing is not None else self.missing


class GraderConfig(StrictModel):
    """The whole config file, as grading reads it: model, engine, audio and parts.

    The HTTP service's ``serving:`` section is kept as it was written; the
    service's own schema, :class:`serve.service.settings.ServiceConfig`, checks it
    (every ``l2grader`` command loads configs with that schema).
    """

    model: ModelConfig
    engine: EngineConfig = EngineConfig()
    audio: AudioConfig = AudioConfig()
    serving: dict[str, Any] = Field(
        default_factory=dict, description="The HTTP service's settings (checked by the service's schema)."
    )
    parts: dict[str, PartConfig] = Field(min_length=1)
    candidate: CandidateConfig = Field(
        default_factory=CandidateConfig,
        description="How a candidate's answers make their overall result: parts, weights, rules, cut scores.",
    )

    @field_validator("parts")
    @classmethod
    def _part_ids(cls, v: dict[str, PartConfig]) -> dict[str, PartConfig]:
        for part in v:
            validate_part_id(part)
        return v

    def part(self, part: str) -> PartConfig:
        """The part's config; :class:`UnknownPartError` names the known parts."""
        try:
            return self.parts[part]
        except KeyError:
            raise UnknownPartError(part, sorted(self.parts)) from None

    def resolve_paths(self, base_dir: Path) -> None:
        """Make relative paths absolute against ``base_dir`` (the config file's folder); a base model that is not
        a folder there stays as written (a hub id)."""
        self.model.base = _resolve(base_dir, self.model.base)
        for part in self.parts.values():
            for holder in (part, *part.aspects.values()):
                if holder.adapter is not None:
                    holder.adapter = beside(base_dir, holder.adapter)
        if self.candidate.calibration is not None:
            self.candidate.calibration.path = beside(base_dir, self.candidate.calibration.path)


class UnknownPartError(KeyError):
    """A request names a part the config does not have; the message names the known parts, and the one it may
    have meant (``did you mean 'interview'?``). Every door (HTTP, command line, sessions, training) says it so.

    ``known`` is how the message lists the parts; ``names`` their bare names (default: ``known``).
    """

    def __init__(self, part: str, known: list[str], names: Iterable[str] | None = None):
        super().__init__(part)
        self.part, self.known = part, known
        self.suggestion = closest(part, known if names is None else names)

    def __str__(self) -> str:
        guess = f"did you mean {self.suggestion!r}? " if self.suggestion else ""
        return f"unknown part {clip(self.part, MAX_PART_ID)!r} ({guess}known parts: {', '.join(self.known)})"


def _resolve(base_dir: Path, value: str | Path) -> str:
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    local = base_dir / p
    # A relative path that exists beside the config is a local folder; otherwise it may be a hub id.
    return str(local.resolve()) if local.exists() or str(value).startswith(".") else str(value)


def beside(base_dir: Path, path: Path) -> Path:
    """``path`` (``~`` expanded) made absolute against ``base_dir`` when relative."""
    p = path.expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


Config = TypeVar("Config", bound=GraderConfig)


def load_config(path: str | Path, schema: type[Config] = GraderConfig) -> Config:
    """Read a config file and validate it with ``schema`` (a :class:`GraderConfig`, or one that adds the service's
    settings); relative paths resolve against the file's folder."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML at {yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping (model, engine, audio, parts)")
    try:
        cfg = schema.model_validate(raw)
    except ValidationError as e:
        why = format_validation_errors(e.errors(), "config", schema)
        raise ConfigError(f"config file {path} is invalid: {why}") from None
    cfg.resolve_paths(path.resolve().parent)
    return cfg
