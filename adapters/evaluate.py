"""Evaluate a part's adapter on a scored test set through the serving path (vLLM).

Every answer of the set is decoded and chunked as in serving and sent to one
:class:`serve.engine.offline.OfflineEngine` in one batch; the soft and hard scores are
compared with the human scores (:mod:`adapters.agreement`), and a calibration
plot of predicted against human scores is drawn.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapters.dataset import Answer, load_answers, read_jsonl
from adapters.agreement import format_metrics, soft_hard_metrics
from serve.grading.adapter_files import check_adapter
from serve.grading.config import VLLM_LORA_RANKS, GraderConfig
from serve.grading.results import ScoredAnswer


def config_for(cfg: GraderConfig, part: str, adapter: str | Path | None = None) -> GraderConfig:
    """A config holding only ``part`` (with ``adapter`` instead of the configured one, when given).

    The engine's ``max_lora_rank`` is raised to the adapter's rank when needed.
    """
    pcfg = cfg.part(part)
    engine = cfg.engine
    if adapter is not None:
        path = Path(adapter).expanduser().resolve()
        rank = check_adapter(path).rank
        pcfg = pcfg.model_copy(update={"adapter": path})
        if rank > engine.max_lora_rank:
            new_rank = min(r for r in VLLM_LORA_RANKS if r >= rank)
            print(f"note: adapter rank {rank}: engine.max_lora_rank raised to {new_rank}", file=sys.stderr)
            engine = engine.model_copy(update={"max_lora_rank": new_rank})
    return cfg.model_copy(update={"parts": {part: pcfg}, "engine": engine})


def score_with_engine(cfg: GraderConfig, part: str, answers: Sequence[Answer]) -> list[ScoredAnswer]:
    """Score every answer with one vLLM engine, all chunks in one batch."""
    from serve.engine.offline import OfflineEngine

    scorer = OfflineEngine(cfg)
    try:
        return scorer.score_answers([(part, list(a.chunks)) for a in answers])
    finally:
        scorer.close()


def calibration_plot(path: str | Path, human: Sequence[float], soft: Sequence[float], hard: Sequence[float],
                     title: str, level_scores: Sequence[float]) -> Path:
    """Predicted against human scores: every answer (soft and hard), the mean per human-score bin, the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    h, s, hd = (np.asarray(x, dtype=float) for x in (human, soft, hard))
    lo, hi = min(level_scores), max(level_scores)
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="perfect agreement")
    ax.scatter(h, hd, s=10, alpha=0.35, color="tab:orange", label="hard (most probable level)")
    ax.scatter(h, s, s=12, alpha=0.6, color="tab:blue", label="soft (expected score)")
    edges = np.arange(lo - 0.5, hi + 1.0, 1.0)
    centres, means = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (h >= a) & (h < b)
        if sel.any():
            centres.append(h[sel].mean())
            means.append(s[sel].mean())
    ax.plot(centres, means, "o-", color="tab:red", lw=2, label="soft, mean per level bin")
    ax.set_xlim(lo - 0.3, hi + 0.3)
    ax.set_ylim(lo - 0.3, hi + 0.3)
    ax.set_xlabel("human score")
    ax.set_ylabel("predicted score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def default_plot_path(data: str | Path, part: str) -> Path:
    data = Path(data)
    return data.with_name(f"{data.stem}.{part}.calibration.png")


def _finite(m: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}


def evaluate(cfg: GraderConfig, part: str, data: str | Path, *, adapter: str | Path | None = None,
             plot: str | Path | None = None, predictions: str | Path | None = None) -> dict[str, Any]:
    """Score ``data`` through vLLM and print the metrics; the last stdout line is their JSON."""
    cfg = config_for(cfg, part, adapter)
    answers, bad = load_answers(read_jsonl(data, part), cfg.audio)
    for ex, why in bad:
        print(f"skipping {ex.audio}: {why}", file=sys.stderr)
    if len(answers) < 2:
        raise ValueError(f"{data}: {len(answers)} usable answers of part {part!r}; at least 2 are needed")
    scored = score_with_engine(cfg, part, answers)
    result = soft_hard_metrics(answers, scored)
    pcfg = cfg.parts[part]
    if predictions is not None:
        with open(predictions, "w") as f:
            for a, s in zip(answers, scored):
                f.write(json.dumps({"audio": str(a.example.audio), "human": a.example.score, "score": s.score,
                                    "hard_score": s.hard_score, "probabilities": s.probabilities}) + "\n")
    plot_path = calibration_plot(
        plot or default_plot_path(data, part),
        [a.example.score for a in answers], [s.score for s in scored], [s.hard_score for s in scored],
        f"{part}: {len(answers)} answers, soft PCC {result['soft']['pcc']:.3f}\n"
        f"adapter: {pcfg.adapter.name if pcfg.adapter else 'none (base model)'}",
        [lv.score for lv in pcfg.levels],
    )
    adapter_desc = scored[0].model.adapter or "none (base model)"
    print(f"{part}: {len(answers)} answers from {data} (skipped {len(bad)}), adapter {adapter_desc}")
    print(format_metrics("soft", result["soft"]))
    print(format_metrics("hard", result["hard"]))
    print(f"calibration plot: {plot_path}")
    print(json.dumps({"soft": _finite(result["soft"]), "hard": _finite(result["hard"])}), flush=True)
    return result
