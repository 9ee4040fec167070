"""``l2grader bench-aspects``' own logic with a fake engine: what each row shares, and its arithmetic.

The real run (one vLLM engine, every row) is in docs/benchmarks.md; here only what the numbers are made of.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from loadtest import aspects_bench as ab
from serve.grading.audio import Chunk, PreparedAnswer


class FakeEngine:
    """The three calls the bench makes; each request's prompt is 100 tokens, 60 of them cached unless salted."""

    def __init__(self, targets: tuple[str, ...]):
        self.targets = targets
        self.calls = []

    def requests(self, answers, specs=None):
        targets = self.targets[:1] if specs else self.targets  # the bench's holistic row passes specs
        return [(t, c) for _, p in answers for c in p.chunks for t in targets]

    def generate(self, requests, salts=None):
        self.calls.append((requests, salts))
        return [SimpleNamespace(prompt_token_ids=[0] * 100, num_cached_tokens=0 if salts else 60) for _ in requests]

    def results(self, answers, outputs, specs=None):
        return []


def answers(n: int) -> list[tuple[str, PreparedAnswer]]:
    rng = np.random.default_rng(0)
    return [
        ("p", PreparedAnswer([Chunk(0.0, 1.0, rng.normal(size=16000).astype(np.float32))], quality=None))
        for _ in range(n)
    ]


def test_rows_share_what_they_say():
    engine, given = FakeEngine(("holistic", "a1", "a2")), answers(4)
    holistic = ab.run_row(engine, "holistic", given, {"p": "no aspects"})
    shared = ab.run_row(engine, "shared", given, None)
    independent = ab.run_row(engine, "independent", given, None)
    separate = ab.run_row(engine, "separate", given, None)
    (h_req, h_salts), (s_req, s_salts), (i_req, i_salts), (x_req, x_salts) = engine.calls
    assert holistic["requests_per_answer"] == 1 and shared["requests_per_answer"] == 3
    assert h_salts is None and s_salts is None  # shared: no salt, so prefix blocks are shared
    assert len(set(i_salts)) == len(i_req) == 12 and len(set(x_salts)) == 12  # a salt of its own per request
    # every run has fresh audio (no run profits from another's caches) ...
    first = {id(c.samples) for _, c in s_req}
    assert first.isdisjoint(id(c.samples) for _, c in i_req) and first.isdisjoint(id(c.samples) for _, c in h_req)
    assert all(not np.array_equal(a.samples, b.samples) for (_, a), (_, b) in zip(s_req[::3], i_req[::3]))
    # ... the targets of one chunk share its audio array, except in the separate row
    assert len({id(c.samples) for _, c in s_req}) == 4 and len({id(c.samples) for _, c in x_req}) == 12
    assert all(np.array_equal(given[0][1].chunks[0].samples[:-1], c.samples[:-1]) for _, c in x_req[:3])
    # prefill tokens: each request's prompt less what the engine found cached
    assert shared["prefill_tokens_per_answer"] == 3 * 40 and shared["cached_tokens_per_answer"] == 3 * 60
    assert independent["prefill_tokens_per_answer"] == separate["prefill_tokens_per_answer"] == 300


def test_a_fresh_chunk_differs_inaudibly_and_leaves_the_original():
    chunk = answers(1)[0][1].chunks[0]
    before = chunk.samples.copy()
    fresh = ab.fresh_chunk(chunk)
    assert np.array_equal(chunk.samples, before)  # the original is untouched
    diff = np.abs(fresh.samples - before)
    assert np.count_nonzero(diff) == 1 and 0 < diff.max() < 1e-3
    assert (fresh.start_s, fresh.end_s) == (chunk.start_s, chunk.end_s)


def test_medians_and_ratios_to_the_holistic_row():
    runs = [ab.run_figures(10, wall, cpu, 10, 5000, 100) for wall, cpu in ((2.0, 1.0), (1.0, 3.0), (4.0, 2.0))]
    m = ab.medians(runs)
    assert m["answers_per_s"] == 5.0 and m["cpu_ms_per_answer"] == 200.0 and m["prefill_tokens_per_answer"] == 500
    with_aspects = dict(m, answers_per_s=4.0, cpu_ms_per_answer=300.0, prefill_tokens_per_answer=750)
    assert ab.cost_ratios(with_aspects, m) == {"time": 1.25, "cpu": 1.5, "prefill": 1.5}
    assert ab.cost_ratios(m, m) == {"time": 1.0, "cpu": 1.0, "prefill": 1.0}
    assert ab.prefill_tokens([SimpleNamespace(prompt_token_ids=[1, 2, 3], num_cached_tokens=None)]) == (3, 0)
