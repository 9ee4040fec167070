"""How the project's clients retry an answer the service could not take now.

The service answers 503 (overloaded, or a scorer replica lost) and 429 (this
client holds too many requests) with ``Retry-After``; a connection that broke
before any answer may be retried too. A client waits at least that long, with
exponential backoff and jitter so that retries do not arrive together, and
sends the answer again with the same ``response_id``, so the platform can
match the one result it keeps.
"""

from __future__ import annotations

import random

#: Statuses that mean "not now": the answer was not scored and may be sent again.
RETRYABLE = frozenset({429, 503})


def retry_delay(
    attempt: int, retry_after: str | None, base_s: float = 0.5, cap_s: float = 30.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before try ``attempt + 1`` (from 0): the larger of ``Retry-After`` and the backoff."""
    backoff = min(cap_s, base_s * 2**attempt) * (0.5 + (rng or random).random() / 2)
    try:
        asked = float(retry_after) if retry_after is not None else 0.0
    except ValueError:
        asked = 0.0
    return min(cap_s, max(asked, backoff))
