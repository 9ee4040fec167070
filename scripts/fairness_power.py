"""How often the fairness screen flags, clears or leaves inconclusive a group with a known bias, by simulation.

A population of :data:`REFERENCE` unbiased candidates and one group of n candidates whose machine scores carry a
planted bias of ``smd`` times the population's pooled SD; human scores uniform on 1.5-5.5, machine = human +
N(0, 0.5) per answer (+ N(0, --candidate-sd) per candidate, shared by all their --answers). Each cell is the share of
``--seeds`` simulations in each status of :func:`adapters.fairness.group_stats` (the group's line of the
table), with its binomial standard error.

    python scripts/fairness_power.py --seeds 200
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from adapters.fairness import CLEAR, FLAGGED, INCONCLUSIVE, SMD_LIMIT_GROUP, Population, Row, group_stats

REFERENCE = 400


def pooled_sd(candidate_sd: float = 0.0) -> float:
    """The population's pooled SD of machine and human scores before any bias: sqrt((2 var_h + 0.5^2 + c^2) / 2)."""
    return math.sqrt((2 * 16 / 12 + 0.25 + candidate_sd**2) / 2)


def simulate(n: int, smd: float, seed: int, answers_per_candidate: int = 1, candidate_sd: float = 0.0) -> list[Row]:
    """Rows of the reference candidates (group "ref") and of ``n`` candidates of group "g" biased by ``smd``."""
    rng = np.random.default_rng(seed)
    rows = []
    for group, count, bias in (("ref", REFERENCE, 0.0), ("g", n, smd * pooled_sd(candidate_sd))):
        for c in range(count):
            effect = rng.normal(0, candidate_sd) if candidate_sd else 0.0
            for _ in range(answers_per_candidate):
                h = rng.uniform(1.5, 5.5)
                p = h + rng.normal(0, 0.5) + effect + bias
                rows.append(Row(float(p), float(h), False, {"g": group}, candidate=f"{group}{c}"))
    return rows


#: The rule this screen replaced, for comparison: flagged only when the whole interval lies beyond the limit.
INTERVAL_RULE = "interval beyond"


def rates(n: int, smd: float, seeds: int, **kw) -> dict[str, float]:
    """The share of each status of group "g" over ``seeds`` simulations, and of the interval rule's flags."""
    counts = {FLAGGED: 0, CLEAR: 0, INCONCLUSIVE: 0, INTERVAL_RULE: 0}
    for seed in range(seeds):
        rows = simulate(n, smd, seed, **kw)
        pop = Population.of([r.pred for r in rows], [r.human for r in rows])
        group = [r for r in rows if r.fields["g"] == "g"]
        line = group_stats("g", "g", group, pop, SMD_LIMIT_GROUP)
        counts[line["status"]] += 1
        ci = line["smd_ci"]
        counts[INTERVAL_RULE] += ci is not None and (ci[0] > SMD_LIMIT_GROUP or ci[1] < -SMD_LIMIT_GROUP)
    return {k: v / seeds for k, v in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--sizes", default="16,30,50,100")
    ap.add_argument("--smds", default="0,0.05,0.10,0.15,0.20")
    ap.add_argument("--answers", type=int, default=1, help="answers per candidate")
    ap.add_argument("--candidate-sd", type=float, default=0.0, help="SD of an error a candidate's answers share")
    args = ap.parse_args()
    kw = {"answers_per_candidate": args.answers, "candidate_sd": args.candidate_sd}
    keys = (FLAGGED, CLEAR, INCONCLUSIVE, INTERVAL_RULE)
    print("| true SMD | candidates | flagged | clear | inconclusive | interval beyond the limit (old rule) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for d in (float(x) for x in args.smds.split(",")):
        for n in (int(x) for x in args.sizes.split(",")):
            r = rates(n, d, args.seeds, **kw)
            se = {k: math.sqrt(v * (1 - v) / args.seeds) for k, v in r.items()}
            cells = " | ".join(f"{100 * r[k]:.0f} % ± {100 * se[k]:.0f}" for k in keys)
            print(f"| {d:.2f} | {n} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
