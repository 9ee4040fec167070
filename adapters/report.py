"""The evaluation as one self-contained HTML page (figures inlined as base64 PNG) beside its JSON.

Figures: predicted against human scores coloured by the review verdict, the
calibration plot, the confusion matrix of levels (human score rounded against
the hard score), and the selective-scoring curves; then the analytic aspects'
agreement and cross-PCC tables (where the data has aspect scores), the
selective-scoring and error-correlation tables, and the fairness tables of
each part and of the overall score.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapters.agreement import METRIC_KEYS
from adapters.fairness import FLAGGED
from serve.grading.results import ScoredAnswer


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str) -> str:
    alt = html.escape(alt)
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{b64}"><figcaption>{alt}</figcaption></figure>'


def _figures(summary: dict, human: Sequence[float], scored: Sequence[ScoredAnswer], level_scores: Sequence[float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = np.asarray(human, float)
    p = np.array([a.score for a in scored])
    hard = np.array([a.hard_score for a in scored])
    review = np.array([a.review.needed for a in scored])
    lo, hi = min(level_scores), max(level_scores)

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    ax.scatter(h[~review], p[~review], s=14, color="tab:blue", label=f"kept ({(~review).sum()})")
    ax.scatter(h[review], p[review], s=18, color="tab:red", marker="x", label=f"for review ({review.sum()})")
    ax.set(xlabel="human score", ylabel="predicted (soft) score", xlim=(lo - 0.3, hi + 0.3), ylim=(lo - 0.3, hi + 0.3))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    scatter = _png(fig)

    levels = list(level_scores)
    idx = {s: i for i, s in enumerate(levels)}
    nearest = lambda x: levels[int(np.argmin([abs(x - s) for s in levels]))]  # noqa: E731
    cm = np.zeros((len(levels), len(levels)), int)
    for a, b in zip(h, hard):
        cm[idx[nearest(a)], idx[nearest(b)]] += 1
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    ax.imshow(cm, cmap="Blues")
    for i in range(len(levels)):
        for j in range(len(levels)):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set_xticks(range(len(levels)), [f"{s:g}" for s in levels])
    ax.set_yticks(range(len(levels)), [f"{s:g}" for s in levels])
    ax.set(xlabel="hard score (most probable level)", ylabel="human score, nearest level")
    confusion = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for name, rows in summary["selective_by_signal"].items():
        ax.plot(
            [100 * r["review_rate"] for r in rows],
            [np.nan if r["pcc"] is None else r["pcc"] for r in rows],
            "o-",
            lw=2.5 if name == summary["selective_signal"] else 1,
            label=name,
        )
    v = summary["review_verdict"]
    if v["pcc"] is not None:
        ax.plot([100 * v["review_rate"]], [v["pcc"]], "k*", ms=14, label="review verdict")
    ax.set(xlabel="answers routed to review (%)", ylabel="PCC of the answers kept")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    curve = _png(fig)
    return scatter, confusion, curve


def _coverage_figure(rows: dict, nominal: float, title: str) -> str:
    """Coverage of every bin (dots) against the range its n allows at nominal coverage (bars), by bin kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in rows["bins"] if b["n"] > 0]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(bins) + 1.5), 3.8), dpi=100)
    x = np.arange(len(bins))
    lo = np.array([b["allowed"][0] for b in bins])
    hi = np.array([b["allowed"][1] for b in bins])
    cov = np.array([b["coverage"] for b in bins])
    ax.bar(x, hi - lo, bottom=lo, width=0.6, color="#ddd", label="range its n allows (5-95 %)")
    colours = ["tab:red" if b["outside"] else "tab:blue" for b in bins]
    ax.scatter(x, cov, c=colours, s=18, zorder=3, label="measured coverage (red: outside)")
    ax.axhline(nominal, color="grey", ls="--", lw=1)
    ax.set_xticks(
        x, [f"{b['kind'].split(':')[-1][:8]}:{str(b['bin'])[:10]} ({b['n']})" for b in bins], rotation=90, fontsize=6
    )
    ax.set_ylim(max(0.0, min(cov.min(), lo.min()) - 0.05), 1.0)
    ax.set_ylabel("coverage")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _png(fig)


def _interval_section(intervals: dict | None) -> str:
    """The intervals' coverage: each method overall and in its worst bin, then every bin of the part's method."""
    if not intervals or not intervals.get("rows"):
        return ""
    rows = intervals["rows"]
    table = _table(
        ["method", "nominal", "n", "coverage", "mean width", "worst bin", "its n", "its coverage", "bins outside"],
        [
            [
                r["method"],
                r["nominal"],
                r["overall"]["n"],
                r["overall"]["coverage"],
                r["overall"]["mean_width"],
                "-" if r["worst_bin"] is None else f"{r['worst_bin']['kind']}={r['worst_bin']['bin']}",
                None if r["worst_bin"] is None else r["worst_bin"]["n"],
                None if r["worst_bin"] is None else r["worst_bin"]["coverage"],
                r["bins_outside"],
            ]
            for r in rows
        ],
    )
    chosen = next((r for r in rows if r["method"] == intervals["method"] and r["nominal"] == 0.9), rows[0])
    figs = [
        _img(
            _coverage_figure(chosen, chosen["nominal"], f"{chosen['method']} at {chosen['nominal']:.0%}, per bin"),
            "Interval coverage per bin",
        )
    ]
    served = intervals.get("served")
    if served:
        figs.append(
            _img(
                _coverage_figure(served, served["nominal"], "the intervals the answers carried, per bin"),
                "Served intervals per bin",
            )
        )
    return (
        f"<h2>Score intervals</h2><p>Calibrated on {intervals['n_calibration']} answers "
        f"({html.escape(intervals['source'])}), measured on {intervals['n_test']} others; "
        f"{intervals['left_out_calibrated']} calibration and "
        f"{intervals['left_out_training']} training answers left out. Each bin's coverage is judged against the "
        "range an exactly nominal method shows at its n.</p>" + table + "".join(figs)
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], flagged: Sequence[bool] | None = None) -> str:
    def cell(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.3f}"
        return html.escape(str(x))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f"<tr{' class=flag' if flagged and flagged[i] else ''}>" + "".join(f"<td>{cell(x)}</td>" for x in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


#: Column headers of :data:`adapters.agreement.METRIC_KEYS`.
AGREEMENT_HEADERS = (
    "PCC",
    "SRC",
    "KRC",
    "RMSE",
    "within 0.5",
    "within 1.0",
    "QWK (levels)",
    "QWK (half levels)",
    "exact level",
    "adjacent level",
)


def _baseline_table(baseline: dict | None) -> str:
    """Human against human where a second human score is at hand, the machine on the same answers, its drop."""
    if not baseline:
        return "<p>No second human score in the data: no human-human baseline.</p>"
    return (
        f"<p>On the {baseline['n']} answers with a second human score: the second human against the first, the "
        "machine against the first, and the machine's drop from the human-human figure (positive: worse).</p>"
        + _table(
            ["", *AGREEMENT_HEADERS],
            [
                [name, *(baseline[key].get(k) for k in METRIC_KEYS)]
                for name, key in (("human-human", "human_human"), ("machine-human", "machine_human"), ("drop", "drop"))
            ],
        )
    )


def _fairness_table(table: Sequence[dict]) -> str:
    def ci(x):
        return "" if x is None else f"[{x[0]:+.2f}, {x[1]:+.2f}]"

    return _table(
        [
            "field",
            "group",
            "answers",
            "candidates",
            "mean error",
            "SMD",
            "SMD 95% interval",
            "DSM",
            "DSM 95% interval",
            "status",
            "PCC",
            "RMSE",
            "exact level",
            "adjacent level",
            "review rate",
            "interval coverage",
        ],
        [
            [
                g["field"],
                g["group"],
                g["n"],
                g["n_candidates"],
                g["mean_error"],
                g["smd"],
                "too small" if g["too_small"] else ci(g["smd_ci"]),
                g["dsm"],
                ci(g["dsm_ci"]),
                f"{g['status']} (limit {g['smd_limit']:.2f})",
                g["pcc"],
                g["rmse"],
                g["exact"],
                g["adjacent"],
                g["review_rate"],
                g["interval_coverage"],
            ]
            for g in table
        ],
        [g["status"] == FLAGGED for g in table],
    )


def _fairness_section(fairness: dict | None) -> str:
    """Each part's fairness table and the overall score's, with what the statuses mean."""
    if not fairness:
        return ""
    lim = fairness["limits"]
    small = fairness["min_group"]
    intro = (
        "<h2>Fairness across groups</h2><p>SMD: the group's mean machine score minus its mean human score, over "
        'the pooled SD of the whole set (Williamson, Xi &amp; Breyer 2012, "A framework for evaluation and use of '
        "automated scoring\"); DSM: the group's mean machine z-score minus its mean human z-score, each on the "
        f"whole set's mean and SD. <b>flagged</b>: |SMD| beyond {lim['overall']:.2f} for the whole set or "
        f"{lim['group']:.2f} for a subgroup; <b>clear</b>: the whole {100 * lim['level']:.0f}% interval (candidates "
        "resampled with all their answers) lies inside the limits; <b>inconclusive</b>: neither, or a group of "
        f"fewer than {small['answers']} answers or {small['candidates']} candidates. Inconclusive is not cleared: "
        "the group has too few answers to say.</p>"
    )
    parts = "".join(
        f"<h3>Part {html.escape(part)}: answers</h3>" + _fairness_table(table)
        for part, table in fairness["parts"].items()
    )
    overall = f"<h3>Overall score</h3><p>{html.escape(fairness['overall_rule'])}.</p>" + _fairness_table(
        fairness["overall"]
    )
    return intro + parts + overall


#: What the report says first when its scores come from the tiny demo checkpoint.
UNTRAINED_BANNER = (
    '<p class="untrained" style="background:#fde2e2;border:2px solid #c00;padding:8px 12px;font-weight:bold">'
    "UNTRAINED: scored by the tiny demo checkpoint (random weights). These numbers mean nothing about the "
    "adapter; evaluate on the real base model.</p>"
)


def write_report(
    out_dir: str | Path,
    summary: dict,
    human: Sequence[float],
    scored: Sequence[ScoredAnswer],
    level_scores: Sequence[float],
    *,
    title: str,
    calibration_png: str | Path | None = None,
) -> Path:
    """Write ``out_dir/report.html`` and ``out_dir/report.json``; returns the HTML's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    scatter, confusion, curve = _figures(summary, human, scored, level_scores)
    figs = [_img(scatter, "Predicted against human scores; crosses: sent to review")]
    if calibration_png is not None and Path(calibration_png).exists():
        figs.append(_img(base64.b64encode(Path(calibration_png).read_bytes()).decode(), "Calibration"))
    figs += [_img(confusion, "Confusion matrix of levels"), _img(curve, "Selective scoring")]
    soft, hard = summary["soft"], summary["hard"]
    agreement = _table(
        ["decoding", *AGREEMENT_HEADERS],
        [[k, *(m.get(key) for key in METRIC_KEYS)] for k, m in (("soft", soft), ("hard", hard))],
    ) + _baseline_table(summary.get("human_baseline"))
    aspects = summary.get("aspects", {})
    aspect_tables = ""
    if aspects:
        names = list(next(iter(summary["aspect_cross_pcc"].values())))  # every human-scored aspect
        aspect_tables = (
            "<h2>Aspects</h2>"
            + _table(
                ["aspect", "n", "PCC", "Spearman", "RMSE", "within 0.5", "within 1.0", "hard PCC"],
                [
                    [a, m["n"], *(m["soft"][k] for k in ("pcc", "spearman", "rmse", "within_0_5", "within_1_0"))]
                    + [m["hard"]["pcc"]]
                    for a, m in aspects.items()
                ],
            )
            + "<p>PCC of each aspect's scores (rows) against every aspect's human scores (columns): an aspect "
            "learned as itself is high on the diagonal only.</p>"
            + _table(
                ["predicted / human", *names],
                [[a, *(row[b] for b in names)] for a, row in summary["aspect_cross_pcc"].items()],
            )
        )
    rates = [r["review_rate"] for r in summary["selective"]]
    selective = _table(
        ["signal", *[f"PCC at {100 * r:.0f}%" for r in rates], "Spearman with |error|"],
        [
            [name, *[r["pcc"] for r in rows], summary["error_spearman"][name]]
            for name, rows in summary["selective_by_signal"].items()
        ],
    )
    v = summary["review_verdict"]
    verdict = _table(
        ["review rate", "kept", "PCC kept", "RMSE kept", "within 0.5 kept", "reasons"],
        [
            [
                v["review_rate"],
                v["n_kept"],
                v["pcc"],
                v["rmse"],
                v["within_0_5"],
                ", ".join(f"{k}: {n}" for k, n in v["reasons"].items()) or "none",
            ]
        ],
    )
    fairness = _fairness_section(summary.get("fairness"))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1200px}}
figure{{display:inline-block;margin:0 1em 1em 0}}
figcaption{{font-size:12px;color:#555}}table{{border-collapse:collapse;margin:0.5em 0 1.5em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#f3f3f3}}
tr.flag td{{background:#fde2e2}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
{UNTRAINED_BANNER if summary.get("untrained") else ""}
<p>{summary["answers"]} answers scored, {summary["not_scorable"]} not scorable (left out).</p>
<h2>Agreement with the human scores</h2>{agreement}
{"".join(figs)}
{aspect_tables}
<h2>Selective scoring</h2>
<p>The most doubtful answers by each signal are routed to human review; PCC of the answers kept.</p>{selective}
<h3>Review verdict (the part's thresholds)</h3>{verdict}
{_interval_section(summary.get("intervals"))}
{fairness}
</body></html>
"""
    (out / "report.html").write_text(page)
    return out / "report.html"
