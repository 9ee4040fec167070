"""Train a part's LoRA adapter on scored answers, as in the paper.

peft LoRA (rank 16 by default) on the language model's projections only
(:data:`serve.grading.adapter_files.LANGUAGE_MODEL_TARGETS`: vLLM applies LoRA nowhere
else); the audio encoder and projector stay frozen. Inputs are built exactly
as serving builds them: the part's prompt (:func:`serve.grading.parts.resolve_part`),
the processor called as vLLM calls it, answers chunked as in serving with
each chunk trained on its answer's score.

The loss (:mod:`adapters.losses`) reads the label tokens' logits at the first
output position, renormalised over the label set (``log_softmax`` over the
label logits only, as serving renormalises its label probabilities):
fair-average soft targets (``fa``, default) or cross-entropy on the rounded
score (``ce``).

A part with analytic aspects (``parts.<part>.aspects``) trains one adapter
for its holistic score and every aspect it scores (those without an adapter
of their own): each chunk contributes the loss of the holistic score, on
the part's prompt, and of each aspect its answer has a human score for, on
that aspect's prompt (:attr:`serve.grading.parts.AspectSpec.prompt`); the
batch's loss is the mean over these (chunk, target) pairs. ``--aspect A``
trains an adapter of its own for aspect ``A`` alone, on A's prompt and the
answers with A's human score (the config then names it: ``aspects: {A:
{adapter: DIR}}``). Defaults follow the paper: 2 epochs, learning rate 1e-4,
cosine schedule (after a short linear warm-up), AdamW.

CPU: float32. One GPU: bfloat16 base weights (LoRA weights stay float32)
with gradient checkpointing.

Output folder::

    DIR/adapter_config.json, adapter_model.safetensors   peft LoRA (loads in vLLM as is)
    DIR/grader_adapter.json                              part, levels, how it was trained
    DIR/training_summary.json                            options, losses, dev metrics, timings
    DIR/dev_predictions.jsonl                            final dev scores (with --dev)
    DIR/checkpoints/step-N/                              adapter + optimizer/scheduler/step state
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.agreement import aspect_agreement, format_aspects, format_metrics, soft_hard_metrics
from adapters.dataset import Answer, TrainItem, answer_ids, load_answers, read_jsonl, train_items
from adapters.losses import LOSSES, loss_fn
from adapters.reference import TORCH_DTYPES, load_base_model, processor_inputs
from serve.grading.adapter_files import LANGUAGE_MODEL_TARGETS, check_adapter, write_adapter_metadata
from serve.grading.config import GraderConfig, UnknownPartError
from serve.grading.parts import AspectSpec, PartSpec, check_part, resolve_part
from serve.grading.results import ScoredAnswer
from serve.grading.scoring import ChunkScore, aggregate, aspect_score, label_distribution
from serve.runtime.console import log

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
SUMMARY_FILE = "training_summary.json"
KEEP_CHECKPOINTS = 2


class TrainError(RuntimeError):
    """Training cannot start or resume (message says why)."""


@dataclass
class TrainOptions:
    """Everything that defines a training run (defaults: the paper's)."""

    part: str
    data: str
    out: str
    dev: str | None = None
    loss: str = "fa"
    epochs: float = 2.0
    lr: float = 1e-4
    rank: int = 16
    alpha: float | None = None  # LoRA alpha; default 2 * rank
    dropout: float = 0.05
    batch_size: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    eval_every: int = 0  # steps between dev evaluations; 0: once per epoch
    save_every: int = 0  # steps between checkpoints; 0: once per epoch
    seed: int = 0
    device: str | None = None  # default: cuda when available, else cpu
    dtype: str | None = None  # default: bfloat16 on cuda, float32 on cpu
    resume: bool = False
    stop_after: int = 0  # stop after this many steps of this invocation (0: run to the end); --resume continues
    progress: bool = True
    aspect: str | None = None  # train an adapter of its own for this aspect of the part (None: the part's adapter)

    # fields that must match for --resume to continue the same run
    RESUME_KEYS = ("part", "aspect", "loss", "epochs", "lr", "rank", "alpha", "batch_size", "warmup_ratio", "seed")


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    last_pos: torch.Tensor  # index of the last prompt token of each row (the first output position's input)
    scores: torch.Tensor


def pick_device(opts: TrainOptions) -> tuple[str, torch.dtype]:
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, TORCH_DTYPES[opts.dtype or ("bfloat16" if device.startswith("cuda") else "float32")]


def part_spec(cfg: GraderConfig, part: str, tokenizer) -> PartSpec:
    """The part's prompt and label tokens, exactly as serving resolves them (without its adapter)."""
    pcfg = cfg.part(part).model_copy(update={"adapter": None})
    return resolve_part(check_part(part, pcfg), tokenizer, cfg)


def trained_aspects(cfg: GraderConfig, spec: PartSpec) -> tuple[AspectSpec, ...]:
    """The part's aspects its own adapter scores (an aspect with an adapter of its own is trained apart)."""
    own = cfg.part(spec.part).aspects
    return tuple(a for a in spec.aspects if own[a.aspect].adapter is None)


def make_batch(
    processor,
    spec: PartSpec | AspectSpec,
    items: Sequence[TrainItem],
    device: str,
    dtype: torch.dtype,
    scores: Sequence[float] | None = None,
) -> Batch:
    """Processor inputs for a batch of chunks (right-padded) on the target's prompt, as serving's engine gets them;
    ``scores``: the target's human scores (default: the items' holistic scores)."""
    inputs = processor_inputs(processor, spec.prompt, [it.chunk.samples for it in items], device, dtype)
    mask = inputs["attention_mask"]
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last_pos = torch.where(mask.bool(), positions, -1).max(dim=1).values
    scores = [it.score for it in items] if scores is None else scores
    return Batch(inputs, last_pos, torch.tensor(list(scores), dtype=torch.float64))


#: Where every target's prompt stops sharing its beginning with the others: the rubric and the audio come first.
AUDIO_END = "<|audio_eos|>"


def target_hidden(
    model,
    processor,
    targets: Sequence[PartSpec | AspectSpec],
    items: Sequence[TrainItem],
    device: str,
    dtype: torch.dtype,
    share_prefix: bool = True,
) -> list[tuple[PartSpec | AspectSpec, list[int], torch.Tensor]]:
    """``(target, rows, last hidden state at the first output position [rows, hidden])`` for each target some items
    have a human score for: the holistic score (every item), then each aspect (the items whose answer has its
    score).

    With ``share_prefix`` the prompts' common beginning (the rubric and the
    audio, up to ``<|audio_eos|>``) runs once, left-padded, and each target's
    question runs on its cached keys and values, as vLLM's prefix cache serves
    the aspects: the same numbers as one full prompt per target, at a fraction
    of the cost. Without it (gradient checkpointing keeps no cache) each
    target runs its whole prompt.
    """
    wanted = []
    for t in targets:
        rows = [i for i, it in enumerate(items) if isinstance(t, PartSpec) or t.aspect in it.aspects]
        if rows:
            wanted.append((t, rows))
    if not share_prefix:
        return [
            (t, rows, _first_output_hidden(model, make_batch(processor, t, [items[i] for i in rows], device, dtype))[1])
            for t, rows in wanted
        ]
    from transformers import DynamicCache

    prefix = targets[0].prompt.split(AUDIO_END)[0] + AUDIO_END
    if not all(t.prompt.startswith(prefix) for t in targets):
        raise ValueError("the targets' prompts do not share the rubric and audio")
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = processor_inputs(processor, prefix, [it.chunk.samples for it in items], device, dtype)
    finally:
        tokenizer.padding_side = side
    mask = inputs["attention_mask"]
    lengths = mask.sum(dim=1, keepdim=True)
    lm = (model.get_base_model() if hasattr(model, "get_base_model") else model).model
    cache = DynamicCache()
    lm(**inputs, position_ids=(mask.cumsum(1) - 1).clamp(min=0), past_key_values=cache, use_cache=True)
    out = []
    for t, rows in wanted:
        question = tokenizer(t.prompt[len(prefix) :], add_special_tokens=False, return_tensors="pt").input_ids
        n = question.shape[1]
        hidden = lm(
            input_ids=question.to(device).expand(len(items), n),
            attention_mask=torch.cat([mask, mask.new_ones(len(items), n)], dim=1),
            position_ids=lengths + torch.arange(n, device=mask.device),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[rows, -1]
        cache.crop(-n)  # back to the shared prefix for the next target
        out.append((t, rows, hidden))
    return out


def target_label_logits(
    model,
    processor,
    targets: Sequence[PartSpec | AspectSpec],
    items: Sequence[TrainItem],
    device: str,
    dtype: torch.dtype,
    share_prefix: bool = True,
) -> list[tuple[PartSpec | AspectSpec, torch.Tensor, torch.Tensor]]:
    """``(target, label logits [rows, labels], human scores [rows])`` for each target some items have a human score
    for (:func:`target_hidden`): what the loss reads."""
    head = (model.get_base_model() if hasattr(model, "get_base_model") else model).lm_head.weight
    out = []
    for t, rows, hidden in target_hidden(model, processor, targets, items, device, dtype, share_prefix):
        scores = [items[i].score if isinstance(t, PartSpec) else items[i].aspects[t.aspect] for i in rows]
        out.append((t, (hidden @ head[list(t.label_token_ids)].T).float(), torch.tensor(scores, dtype=torch.float64)))
    return out


def label_logits(model, batch: Batch, label_ids: Sequence[int]) -> torch.Tensor:
    """Logits of the label tokens at the first output position, ``[batch, n_labels]``.

    Runs the language model once and applies only the label rows of the output
    head to the one position that matters: the same numbers as the full
    logits, without a ``[batch, tokens, vocabulary]`` tensor.
    """
    base, h = _first_output_hidden(model, batch)
    w = base.lm_head.weight[list(label_ids)]
    return (h @ w.T).float()


def _first_output_hidden(model, batch: Batch):
    """(the base model, the last hidden state at each chunk's first output position)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(**batch.inputs, use_cache=False).last_hidden_state
    return base, hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.last_pos]


def label_logprobs(model, batch: Batch, label_ids: Sequence[int]) -> torch.Tensor:
    """Full-vocabulary log-probabilities of the label tokens at the first output position (what serving reads)."""
    base, h = _first_output_hidden(model, batch)
    return torch.log_softmax((h @ base.lm_head.weight.T).float(), dim=-1)[:, list(label_ids)]


@torch.no_grad()
def score_answers(
    model,
    processor,
    spec: PartSpec,
    answers: Sequence[Answer],
    *,
    batch_size: int,
    device: str,
    dtype: torch.dtype,
    aspects: Sequence[AspectSpec] | None = None,
) -> list[ScoredAnswer]:
    """Score answers with the model in eval mode: the trainer's own evaluation (transformers + peft), the holistic
    score and each of ``aspects`` (default: all the part's)."""
    was_training = model.training
    model.eval()
    targets = (spec, *(spec.aspects if aspects is None else aspects))
    # every chunk is scored for every target: mark each as having every aspect
    items = [replace(it, aspects={t.aspect: 0.0 for t in targets[1:]}) for it in train_items(list(answers))]
    head = (model.get_base_model() if hasattr(model, "get_base_model") else model).lm_head.weight
    dists: dict[int, list[tuple[np.ndarray, float]]] = {n: [] for n in range(len(targets))}
    for i in range(0, len(items), batch_size):
        for n, (t, _, h) in enumerate(
            target_hidden(model, processor, targets, items[i : i + batch_size], device, dtype)
        ):
            lp = torch.log_softmax((h @ head.T).float(), dim=-1)[:, list(t.label_token_ids)].cpu().numpy()
            dists[n].extend(label_distribution(row) for row in lp)
    if was_training:
        model.train()
    results, k = [], 0
    for ans in answers:
        chunks = [
            [ChunkScore(c.start_s, c.end_s, *dists[n][k + j]) for j, c in enumerate(ans.chunks)]
            for n in range(len(targets))
        ]
        k += len(ans.chunks)
        scored = aggregate(spec.part, spec.levels, chunks[0], spec.model, spec.intervals)
        scored.aspects = {
            t.aspect: aspect_score(t.levels, cs, t.adapter_name) for t, cs in zip(targets[1:], chunks[1:])
        }
        results.append(scored)
    return results


def dev_metrics(answers: Sequence[Answer], scored: Sequence[ScoredAnswer], aspect: str | None = None) -> dict[str, Any]:
    """The soft and hard metrics of what the adapter scores (the holistic score, or ``aspect`` for an aspect's own
    adapter), and each aspect's agreement (:func:`aspect_agreement`)."""
    predicted = [{a: (s.score, s.hard_score) for a, s in sc.aspects.items()} for sc in scored]
    agreement = aspect_agreement(predicted, [a.example.aspects for a in answers])
    if aspect is not None:
        own = agreement["aspects"][aspect]
        return {"soft": own["soft"], "hard": own["hard"], "n": own["n"], **agreement}
    return {**soft_hard_metrics(answers, scored), **agreement}


def _with_aspect(answers: list[Answer], aspect: str, what: str) -> list[Answer]:
    """The answers with a human score of ``aspect`` (what its own adapter learns from)."""
    kept = [a for a in answers if aspect in a.example.aspects]
    if len(kept) < len(answers):
        log(f"{len(answers) - len(kept)} {what} answers have no {aspect} score: left out")
    return kept


# ---------------------------------------------------------------- checkpoints


def _checkpoints(out: Path) -> list[Path]:
    d = out / CHECKPOINTS
    found = [p for p in d.glob("step-*") if (p / STATE_FILE).is_file()] if d.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out: Path, model, optimizer, scheduler, state: dict[str, Any]) -> Path:
    """Adapter + optimizer/scheduler/step state under ``out/checkpoints/step-N``; keeps the newest few."""
    ckpt = out / CHECKPOINTS / f"step-{state['step']}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            **state,
        },
        tmp / STATE_FILE,
    )
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)
    for old in _checkpoints(out)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict[str, Any]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


# ---------------------------------------------------------------- training


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train(cfg: GraderConfig, opts: TrainOptions) -> dict[str, Any]:
    """Train one part's adapter; returns the run summary (also written to ``out/training_summary.json``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    if opts.loss not in LOSSES:
        raise TrainError(f"unknown loss {opts.loss!r} (choose from {', '.join(LOSSES)})")
    try:
        part_aspects = cfg.part(opts.part).aspects
    except UnknownPartError as e:
        raise TrainError(str(e)) from None
    if opts.aspect is not None and opts.aspect not in part_aspects:
        raise TrainError(
            f"part {opts.part!r} has no aspect {opts.aspect!r} (its aspects: {', '.join(part_aspects) or 'none'})"
        )
    out = Path(opts.out)
    existing = _checkpoints(out)
    if existing and not opts.resume:
        raise TrainError(
            f"{out} already holds checkpoints of a run; pass --resume to continue it or pick another --out"
        )
    t_start = time.time()
    torch.manual_seed(opts.seed)
    device, dtype = pick_device(opts)

    train_ex = read_jsonl(opts.data, opts.part)
    answers, bad = load_answers(train_ex, cfg.audio)
    for ex, why in bad:
        log(f"skipping {ex.audio}: {why}")
    if opts.aspect is not None:
        answers = _with_aspect(answers, opts.aspect, "training")
    if not answers:
        have = "" if opts.aspect is None else f" with a {opts.aspect} score"
        raise TrainError(f"no usable answers of part {opts.part!r}{have} in {opts.data}")
    items = train_items(answers)
    dev_answers: list[Answer] = []
    if opts.dev:
        dev_answers, dev_bad = load_answers(read_jsonl(opts.dev, opts.part), cfg.audio)
        for ex, why in dev_bad:
            log(f"skipping dev {ex.audio}: {why}")
        if opts.aspect is not None:
            dev_answers = _with_aspect(dev_answers, opts.aspect, "dev")

    model, processor = load_base_model(cfg.model.base, dtype, device)
    spec = part_spec(cfg, opts.part, processor.tokenizer)
    if opts.aspect is None:
        aspects = trained_aspects(cfg, spec)
        targets: tuple[PartSpec | AspectSpec, ...] = (spec, *aspects)
    else:
        aspects = tuple(a for a in spec.aspects if a.aspect == opts.aspect)
        targets = aspects  # the aspect alone
    aspect_answers = {a.aspect: sum(a.aspect in x.example.aspects for x in answers) for a in aspects}
    unknown = sorted({k for x in answers for k in x.example.aspects} - set(aspect_answers))
    if unknown:
        log(f"the data scores aspects this adapter does not score ({', '.join(unknown)}): their scores are not used")
    lora = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha if opts.alpha is not None else 2 * opts.rank,
        lora_dropout=opts.dropout,
        target_modules=LANGUAGE_MODEL_TARGETS,
        bias="none",
    )
    model = get_peft_model(model, lora)
    checkpointing = device.startswith("cuda")
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    share_prefix = not checkpointing  # gradient checkpointing keeps no key-value cache
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()

    steps_per_epoch = math.ceil(len(items) / opts.batch_size)
    total_steps = max(1, math.ceil(opts.epochs * steps_per_epoch))
    warmup = int(round(opts.warmup_ratio * total_steps))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    eval_every = opts.eval_every or steps_per_epoch
    save_every = opts.save_every or steps_per_epoch
    compute_loss = loss_fn(opts.loss)

    step, history, losses = 0, [], []
    if opts.resume and existing:
        state = load_checkpoint(existing[-1], model, optimizer, scheduler)
        saved = state["options"]
        diff = {
            k: (saved.get(k), getattr(opts, k)) for k in TrainOptions.RESUME_KEYS if saved.get(k) != getattr(opts, k)
        }
        if diff:
            raise TrainError(f"--resume: options differ from the checkpointed run: {diff}")
        if state["n_items"] != len(items):
            raise TrainError(f"--resume: the data changed ({state['n_items']} chunks then, {len(items)} now)")
        if state.get("aspects", []) != list(aspect_answers):
            raise TrainError(
                f"--resume: the part's aspects changed ({state.get('aspects', [])} then, {list(aspect_answers)} now)"
            )
        step, history, losses = state["step"], state["history"], state["losses"]
        log(f"resuming from {existing[-1]} (step {step} of {total_steps})")
    elif opts.resume:
        log(f"--resume: no checkpoint in {out / CHECKPOINTS}, starting afresh")

    what = f"part {opts.part!r}" + ("" if opts.aspect is None else f" aspect {opts.aspect!r}")
    log(
        f"training {what}: {len(answers)} answers ({len(items)} chunks), {total_steps} steps "
        f"of {opts.batch_size}, loss {opts.loss}, rank {opts.rank}, lr {opts.lr:g}, {n_trainable:,} trainable "
        f"parameters, {device}/{str(dtype).removeprefix('torch.')}"
        + "".join(f"; aspect {a}: {n} answers scored" for a, n in aspect_answers.items())
    )

    # the dev answers are scored for the aspects they have human scores for
    dev_aspects = tuple(a for a in aspects if any(a.aspect in x.example.aspects for x in dev_answers))

    def score_dev() -> list:
        return score_answers(
            model,
            processor,
            spec,
            dev_answers,
            batch_size=opts.batch_size,
            device=device,
            dtype=dtype,
            aspects=dev_aspects,
        )

    def evaluate_dev() -> dict[str, Any] | None:
        return {"step": step, **dev_metrics(dev_answers, score_dev(), opts.aspect)} if dev_answers else None

    def state_dict() -> dict[str, Any]:
        return {
            "step": step,
            "history": history,
            "losses": losses,
            "n_items": len(items),
            "aspects": list(aspect_answers),
            "options": _opts_dict(opts),
        }

    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=total_steps, initial=step, desc=f"train {opts.part}", unit="step", file=sys.stderr, dynamic_ncols=True
        )
    t_train = time.time()
    steps_this_run = 0
    while step < total_steps:
        if opts.stop_after and steps_this_run >= opts.stop_after:
            break
        epoch, offset = divmod(step, steps_per_epoch)
        order = _epoch_order(len(items), opts.seed, epoch)
        idx = order[offset * opts.batch_size : (offset + 1) * opts.batch_size]
        optimizer.zero_grad(set_to_none=True)
        # the mean over (chunk, target) pairs
        logits = target_label_logits(model, processor, targets, [items[i] for i in idx], device, dtype, share_prefix)
        n_pairs = sum(len(scores) for _, _, scores in logits)
        loss = sum(
            compute_loss(lg, scores, [lv.score for lv in t.levels]) * (len(scores) / n_pairs)
            for t, lg, scores in logits
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        steps_this_run += 1
        losses.append(round(loss.item(), 6))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        elif step % 10 == 0 or step == total_steps:
            log(f"step {step}/{total_steps} loss {np.mean(losses[-20:]):.4f} lr {scheduler.get_last_lr()[0]:.2e}")
        if step % eval_every == 0 and step < total_steps and dev_answers:
            m = evaluate_dev()
            history.append(m)
            line = f"[step {step}] dev " + format_metrics("soft", m["soft"]) + _aspect_pccs(m)
            bar.write(line, file=sys.stderr) if bar is not None else log(line)
        stopping = bool(opts.stop_after) and steps_this_run >= opts.stop_after
        if step % save_every == 0 or step == total_steps or stopping:
            save_checkpoint(out, model, optimizer, scheduler, state_dict())
    if bar is not None:
        bar.close()
    train_s = time.time() - t_train
    if step < total_steps:
        log(f"stopped after step {step} of {total_steps}; continue with --resume")
        return {
            "part": opts.part,
            "finished": False,
            "steps": step,
            "total_steps": total_steps,
            "train_seconds": round(train_s, 2),
            "adapter": None,
        }

    # the adapter itself, at the top of the output folder
    model.save_pretrained(out)
    training_meta = {
        "kind": "lora-sft",
        "loss": opts.loss,
        "epochs": opts.epochs,
        "lr": opts.lr,
        "rank": opts.rank,
        "steps": step,
        "batch_size": opts.batch_size,
        "train_answers": len(answers),
        "train_chunks": len(items),
        "data": str(Path(opts.data).resolve()),
        "base": cfg.model.base,
        "aspects": aspect_answers,  # aspect -> training answers with its human score
        # what calibrate and evaluate keep out of their held-out sets
        "answer_ids": answer_ids(answers),
        "speakers": sorted({a.example.speaker for a in answers if a.example.speaker is not None}),
    }
    levels = (aspects[0] if opts.aspect else spec).levels
    write_adapter_metadata(out, part=opts.part, levels=levels, training=training_meta, aspect=opts.aspect)
    check_adapter(out)

    final = None
    if dev_answers:
        scored = score_dev()
        final = {"step": step, **dev_metrics(dev_answers, scored, opts.aspect)}
        history.append(final)
        with open(out / "dev_predictions.jsonl", "w") as f:
            for a, s in zip(dev_answers, scored):
                own = s if opts.aspect is None else s.aspects[opts.aspect]  # what this adapter scores
                f.write(
                    json.dumps(
                        {
                            "audio": str(a.example.audio),
                            "human": a.example.score if opts.aspect is None else a.example.aspects[opts.aspect],
                            "score": own.score,
                            "hard_score": own.hard_score,
                            "human_aspects": a.example.aspects,
                            "aspects": {k: v.score for k, v in s.aspects.items()},
                        }
                    )
                    + "\n"
                )
    summary = {
        "part": opts.part,
        "aspect": opts.aspect,
        "finished": True,
        "options": _opts_dict(opts),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "trainable_parameters": n_trainable,
        "train_answers": len(answers),
        "train_chunks": len(items),
        "aspects": aspect_answers,
        "skipped_answers": len(bad),
        "dev_answers": len(dev_answers),
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "steps_this_run": steps_this_run,
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(losses[-max(1, steps_per_epoch // 4) :])) if losses else None,
        "losses": losses,
        "dev_history": history,
        "dev_final": final,
        "train_seconds": round(train_s, 2),
        "total_seconds": round(time.time() - t_start, 2),
        "adapter": str(out.resolve()),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _opts_dict(opts: TrainOptions) -> dict[str, Any]:
    d = asdict(opts)
    d.pop("progress", None)
    return d


def format_summary(s: dict[str, Any]) -> str:
    """A short human-readable account of a run."""
    if not s.get("finished", True):
        return f"stopped at step {s['steps']} of {s['total_steps']}: run again with --resume to finish"
    lines = [
        f"trained {s['part']!r}{'' if s.get('aspect') is None else ' aspect ' + repr(s['aspect'])} adapter"
        f" -> {s['adapter']}",
        f"  {s['train_answers']} answers ({s['train_chunks']} chunks), {s['steps']} steps, "
        f"loss {s['options']['loss']} {s['first_loss']:.4f} -> {s['final_loss']:.4f}, "
        f"{s['train_seconds']:.1f} s training on {s['device']}",
    ]
    if s["dev_final"]:
        lines.append("  dev " + format_metrics("soft", s["dev_final"]["soft"]))
        lines.append("  dev " + format_metrics("hard", s["dev_final"]["hard"]))
        lines += ["  dev " + line for line in format_aspects(s["dev_final"])]
    return "\n".join(lines)


def _aspect_pccs(m: dict[str, Any]) -> str:
    return "".join(f"; {a} PCC {v['soft']['pcc']:.3f}" for a, v in m.get("aspects", {}).items())
