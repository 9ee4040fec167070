"""Training objectives over the label tokens: fair-average (soft targets) and cross-entropy.

Both losses read the logits of the part's label tokens at the first output
position (the position whose distribution serving turns into a score) and
renormalise them over the label set: ``log_softmax`` is taken over the label
logits only, exactly as serving renormalises the label probabilities. The
rest of the vocabulary takes no part in the loss.

- **Fair-average loss** (``fa``, the paper's best): the human score is a fair
  average of raters, so it is continuous. Its target distribution puts all
  mass on the two labels whose level scores bracket it, split linearly so
  that the target's expected score equals the human score (3.25 -> 0.75 on
  the level scored 3, 0.25 on the level scored 4). Scores outside the scale
  clip to its end labels. Loss = cross-entropy against that soft target.
- **Cross-entropy** (``ce``): the target is the single label of the rounded
  score (the nearest level; a tie goes to the higher level, as in
  :func:`serve.grading.levels.nearest_level`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LOSSES = ("fa", "ce")


def soft_targets(scores: torch.Tensor, level_scores: Sequence[float]) -> torch.Tensor:
    """Target distributions ``[batch, n_levels]`` for continuous ``scores`` (fair-average split).

    ``level_scores`` must be strictly increasing (the scale's order).
    """
    ls = torch.as_tensor(level_scores, dtype=torch.float64)
    if ls.ndim != 1 or len(ls) < 2 or not bool(torch.all(ls[1:] > ls[:-1])):
        raise ValueError(f"level scores must increase strictly, got {list(level_scores)}")
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1).clamp(ls[0], ls[-1])
    # index of the upper bracketing level: first level score >= s (at least 1, so the lower one exists)
    upper = torch.searchsorted(ls, s, right=False).clamp(1, len(ls) - 1)
    lower = upper - 1
    w_upper = (s - ls[lower]) / (ls[upper] - ls[lower])
    targets = torch.zeros(len(s), len(ls), dtype=torch.float64)
    rows = torch.arange(len(s))
    targets[rows, lower] = 1.0 - w_upper
    targets[rows, upper] += w_upper
    return targets


def hard_targets(scores: torch.Tensor, level_scores: Sequence[float]) -> torch.Tensor:
    """Index of the level nearest each score (ties go to the higher level)."""
    ls = torch.as_tensor(level_scores, dtype=torch.float64)
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1, 1)
    dist = (s - ls.reshape(1, -1)).abs()
    # prefer the higher level on a tie: search from the top
    flipped = torch.argmin(dist.flip(1), dim=1)
    return (len(ls) - 1 - flipped).long()


def label_log_probs(label_logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities renormalised over the label set (log_softmax over the label logits only)."""
    return torch.log_softmax(label_logits.float(), dim=-1)


def fair_average_loss(label_logits: torch.Tensor, scores: torch.Tensor, level_scores: Sequence[float]) -> torch.Tensor:
    """Mean cross-entropy of the label distribution against the fair-average soft targets."""
    targets = soft_targets(scores, level_scores).to(label_logits.device, torch.float32)
    return -(targets * label_log_probs(label_logits)).sum(dim=-1).mean()


def cross_entropy_loss(label_logits: torch.Tensor, scores: torch.Tensor, level_scores: Sequence[float]) -> torch.Tensor:
    """Mean cross-entropy against the label of the rounded (nearest-level) score."""
    idx = hard_targets(scores, level_scores).to(label_logits.device)
    return torch.nn.functional.nll_loss(label_log_probs(label_logits), idx)


def loss_fn(name: str):
    """The loss function for a ``--loss`` flag value."""
    try:
        return {"fa": fair_average_loss, "ce": cross_entropy_loss}[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r} (choose from {', '.join(LOSSES)})") from None
