"""Training works: an adapter trained on a synthetic speaking test learns the score, and vLLM serves it as trained.

The synthetic test (``l2grader synth-data``, espeak-ng) makes the score a known
function of speaking rate, pauses and hesitations. On the tiny random
checkpoint the untrained demo adapter's held-out PCC is near zero; after
training the LoRA on the language model (the audio tower stays frozen) it must
reach 0.7 and gain at least 0.5. The trained adapter, served through vLLM by
``l2grader evaluate``, must give the scores the trainer's own transformers +
peft evaluation gives (within 1e-3).

The tiny model learns faster with a larger learning rate and more epochs than
the paper's defaults (2 epochs, 1e-4), which stay the CLI's defaults.

With ``--aspects`` the synthetic test draws four analytic aspects independently,
each audible through its own property of the speech. The interview scores
pronunciation with an adapter of its own (``train --aspect pronunciation``) and
the other three with the part's adapter (trained with the holistic score); each
learnable aspect must be learned as itself: its held-out PCC against its own
human scores well above its PCC against the other aspects' truths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from adapters.agreement import METRIC_KEYS
from adapters.evaluate import fingerprint_of
from adapters.synth import VOICES
from serve.grading.adapter_files import METADATA_FILE, check_adapter
from serve.grading.config import load_config
from tests.conftest import l2grader as run_l2grader
from tests.conftest import require_espeak

pytestmark = pytest.mark.slow  # synthesizes a speaking test and trains on it

TRAIN_FLAGS = ["--lr", "1e-3", "--epochs", "3", "--batch-size", "16", "--dropout", "0", "--rank", "16"]
N_TRAIN, N_DEV, N_TEST = 300, 40, 100


def l2grader(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_l2grader(*args, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0 or not check, (
        f"l2grader {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    )
    return proc


def train_interview(config, data, out, *flags: str) -> subprocess.CompletedProcess:
    """``l2grader train`` of an interview adapter from ``data`` to ``out`` (progress as lines), with ``flags``."""
    return l2grader(
        "train",
        "--config",
        str(config),
        "--part",
        "interview",
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
        *flags,
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    require_espeak()
    d = tmp_path_factory.mktemp("synth")
    l2grader(
        "synth-data", str(d), "--n-train", str(N_TRAIN), "--n-dev", str(N_DEV), "--n-test", str(N_TEST), "--seed", "0"
    )
    return d


BIAS_VOICE = "en-gb-scotland"


@pytest.fixture(scope="module")
def degraded(tmp_path_factory) -> Path:
    """A held-out set with 30 % degraded answers and a +0.8 bias in one voice's human scores."""
    require_espeak()
    d = tmp_path_factory.mktemp("degraded")
    l2grader(
        "synth-data",
        str(d),
        "--n-train",
        "0",
        "--n-dev",
        "0",
        "--n-test",
        "150",
        "--seed",
        "1",
        "--degrade",
        "0.3",
        "--bias-voice",
        BIAS_VOICE,
        "--bias",
        "0.8",
    )
    return d


@pytest.fixture(scope="module")
def run(synth, tiny_config, tmp_path_factory) -> dict:
    """Evaluate the demo adapter, train a new one, evaluate it: everything through the CLI.

    The interview is configured without its aspects: these answers have holistic scores only, and a part's
    prompt holds the rubrics of the aspects it has, so its adapter is trained and served on the holistic prompt."""
    import yaml

    d = tmp_path_factory.mktemp("train_run")
    raw = tiny_config()
    raw["parts"]["interview"].pop("aspects", None)
    cfg = str(d / "holistic.yaml")
    Path(cfg).write_text(yaml.safe_dump(raw))
    test = str(synth / "test.jsonl")
    timings = {}

    t = time.time()
    before = l2grader(
        "evaluate",
        "--config",
        cfg,
        "--part",
        "interview",
        "--data",
        test,
        "--plot",
        str(d / "untrained.png"),
        "--predictions",
        str(d / "untrained.jsonl"),
    )
    timings["evaluate_untrained_s"] = time.time() - t

    t = time.time()
    trained = train_interview(
        cfg, synth / "train.jsonl", d / "adapter", "--dev", str(synth / "dev.jsonl"), *TRAIN_FLAGS
    )
    timings["train_s"] = time.time() - t

    t = time.time()
    after = l2grader(
        "evaluate",
        "--config",
        cfg,
        "--part",
        "interview",
        "--data",
        test,
        "--adapter",
        str(d / "adapter"),
        "--plot",
        str(d / "trained.png"),
        "--predictions",
        str(d / "trained.jsonl"),
    )
    timings["evaluate_trained_s"] = time.time() - t
    print(f"\ntraining test timings: {timings}", file=sys.stderr)
    return {
        "dir": d,
        "cfg": cfg,
        "test": test,
        "adapter": d / "adapter",
        "timings": timings,
        "before": last_json(before.stdout),
        "after": last_json(after.stdout),
        "train_stdout": trained.stdout,
        "eval_stdout": after.stdout,
    }


@pytest.mark.engine
def test_evaluate_shows_which_scores_to_trust(run, degraded, tmp_path):
    """On degraded held-out answers: routing the most uncertain 10 % raises the PCC of the rest, degraded
    answers go to review far more often than clean ones, and the planted bias is flagged."""
    proc = l2grader(
        "evaluate",
        "--config",
        run["cfg"],
        "--part",
        "interview",
        "--data",
        str(degraded / "test.jsonl"),
        "--adapter",
        str(run["adapter"]),
        "--group-by",
        "voice,degradation",
        "--report",
        str(tmp_path / "r"),
        "--plot",
        str(tmp_path / "cal.png"),
    )
    out = last_json(proc.stdout)
    print("\n" + "\n".join(proc.stdout.splitlines()[-30:-1]), file=sys.stderr)
    selective = out["selective"]
    assert [r["review_rate"] for r in selective] == [0, 0.05, 0.10, 0.20, 0.30]
    assert all({"review_rate", "pcc", "rmse", "within_0_5"} <= set(r) for r in selective)
    assert selective[2]["pcc"] > selective[0]["pcc"]
    assert set(out["error_spearman"]) >= {"score_sd", "entropy", "label_mass", "chunk_spread", "snr_db"}
    table = out["fairness"]["parts"]["interview"]
    groups = {(g["field"], g["group"]): g for g in table}
    clean = groups[("degradation", "(none)")]
    for kind in ("noise", "clipping", "gaps"):
        assert groups[("degradation", kind)]["review_rate"] >= 0.8, kind
    assert clean["review_rate"] <= 0.3
    # The planted bias: the voice's SMD (on the whole set's pooled SD) lies beyond the subgroup limit (-0.10) and is
    # the most negative of all voices (on ~15 answers its 95 % interval may still reach zero).
    biased = groups[("voice", BIAS_VOICE)]
    voices = [g for g in table if g["field"] == "voice" and not g["too_small"]]
    assert biased["smd"] < -0.1 and not biased["too_small"], biased
    assert min(voices, key=lambda g: g["smd"])["group"] == BIAS_VOICE, [(g["group"], g["smd"]) for g in voices]
    intervals = out["intervals"]  # no calibration beside this adapter: one half calibrates, the other is measured
    assert intervals["n_test"] >= 40 and len(intervals["rows"]) == 9  # 3 methods x 80/90/95 %
    for row in intervals["rows"]:  # every bin says its n and the range that n allows
        assert row["overall"]["n"] == intervals["n_test"]
        assert {"predicted_level", "human_level", "score_sd", "position", "chunks", "group:voice"} <= {
            b["kind"] for b in row["bins"]
        }
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and BIAS_VOICE in html  # with the per-bin coverage plot
    assert "Score intervals" in html
    assert '<p class="untrained"' in html  # the tiny checkpoint's scores are marked as meaning nothing
    assert biased["status"] == "flagged"  # the point estimate beyond the limit flags it, however wide its interval
    assert {g["group"] for g in out["fairness"]["overall"] if g["field"] == "voice"} >= {BIAS_VOICE}
    assert json.loads((tmp_path / "r" / "report.json").read_text())["fairness"] == out["fairness"]


def test_synth_data_is_a_scored_speaking_test(synth):
    import soundfile as sf

    for name, n in (("train", N_TRAIN), ("dev", N_DEV), ("test", N_TEST)):
        rows = [json.loads(line) for line in (synth / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == n
        scores = [r["score"] for r in rows]
        assert 1.0 <= min(scores) and max(scores) <= 6.0 and max(scores) - min(scores) > 3.5
        for r in rows[:10]:
            info = sf.info(synth / r["audio"])
            assert info.samplerate == 16000 and 1.5 <= info.duration <= 7.0
            assert r["part"] == "interview" and r["voice"] in VOICES and r.get("degradation") is None


def test_synth_data_degrades_and_biases_held_out_answers(degraded):
    rows = [json.loads(line) for line in (degraded / "test.jsonl").read_text().splitlines()]
    kinds = [r["degradation"] for r in rows]
    assert 0.2 < sum(k is not None for k in kinds) / len(rows) < 0.4
    assert set(kinds) - {None} == {"noise", "clipping", "gaps", "truncation"}
    biased = [r for r in rows if r["voice"] == BIAS_VOICE]
    assert biased and all(r["score"] == min(6.0, round(r["true_score"] + 0.8, 3)) for r in biased)
    assert not any("true_score" in r for r in rows if r["voice"] != BIAS_VOICE)


@pytest.mark.engine
def test_training_lifts_held_out_pcc(run):
    before, after = run["before"]["soft"]["pcc"], run["after"]["soft"]["pcc"]
    print(f"\nheld-out soft PCC: untrained {before:.3f} -> trained {after:.3f}", file=sys.stderr)
    assert after >= 0.7
    assert after >= before + 0.5
    assert run["after"]["soft"]["rmse"] < run["before"]["soft"]["rmse"]


@pytest.mark.engine
def test_evaluate_reports_every_metric_and_draws_the_plot(run):
    for key in ("before", "after"):
        assert set(run[key]) == {
            "soft",
            "hard",
            "answers",
            "not_scorable",
            "selective",
            "selective_signal",
            "selective_by_signal",
            "error_spearman",
            "review_verdict",
            "fairness",
            "human_baseline",
            "intervals",
            "untrained",
            "aspects",
            "aspect_cross_pcc",
            "classification",
        }
        assert run[key]["aspects"] == {}  # the holistic test set has no aspect scores
        assert run[key]["untrained"] is True  # the base model is the random tiny checkpoint, trained adapter or not
        for kind in ("soft", "hard"):
            assert tuple(run[key][kind]) == METRIC_KEYS
        assert run[key]["human_baseline"] is None  # the synthetic test set has one human score per answer
    assert "PCC" in run["eval_stdout"] and "within 0.5" in run["eval_stdout"]
    for png in ("untrained.png", "trained.png"):
        data = (run["dir"] / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.engine
def test_calibrated_intervals_cover_held_out_answers(run, synth, tmp_path):
    """`l2grader calibrate` on the dev set stores a calibration tied to the adapter's hash; on the test set
    (scored by the run's evaluate, never calibrated on) its intervals cover about as often as they say."""
    import shutil

    from serve.grading import calibration

    adapter = tmp_path / "adapter"
    shutil.copytree(run["adapter"], adapter)
    args = ("--config", run["cfg"], "--part", "interview", "--adapter", str(adapter))
    proc = l2grader("calibrate", *args, "--data", str(synth / "dev.jsonl"), check=False)
    assert proc.returncode == 1 and "--allow-small" in proc.stderr  # 40 answers are too few for a 90 % interval
    assert not (adapter / calibration.CALIBRATION_FILE).exists()
    proc = l2grader("calibrate", *args, "--data", str(synth / "train.jsonl"), "--allow-small", check=False)
    assert proc.returncode == 1 and "training answers" in proc.stderr  # the adapter's own training answers
    proc = l2grader("calibrate", *args, "--data", str(synth / "dev.jsonl"), "--allow-small")
    assert "per bin" in proc.stdout and "realised coverage" in proc.stdout
    cfg = load_config(run["cfg"])
    cfg = cfg.model_copy(
        update={"parts": {"interview": cfg.parts["interview"].model_copy(update={"adapter": adapter})}}
    )
    serving = fingerprint_of(cfg, "interview", check_adapter(adapter).content_hash)
    state = calibration.load(adapter, serving)
    assert state.status == "calibrated" and state.calibration.n == N_DEV, state.detail
    assert state.calibration.small_sample is not None and state.calibration.small_sample.required > N_DEV
    assert calibration.load(adapter, {**serving, "adapter": "0" * 16}).status == "stale_calibration"
    rows = [json.loads(line) for line in (run["dir"] / "trained.jsonl").read_text().splitlines()]
    h = np.array([r["human"] for r in rows])
    s, sd = [r["score"] for r in rows], [r["uncertainty"]["score_sd"] for r in rows]
    lines = []
    for method in calibration.METHODS:
        for c in calibration.REPORT_COVERAGES:
            low, high = calibration.intervals_of(state.calibration.rule(method, c), s, sd, state.calibration.scale)
            cov, width = float(np.mean((h >= low) & (h <= high))), float(np.mean(high - low))
            lines.append(f"{method} {c}: {cov:.3f} width {width:.3f}")
            # 40 answers calibrate, 100 are measured: a realised coverage spreads by several points each way
            assert c - 0.15 <= cov, lines[-1]
            assert width < 5.0 and (c == 0.95 or cov < 1.0 or width < 4.0), lines[-1]  # not the whole scale
    print("\n" + "\n".join(lines), file=sys.stderr)


def trainer_scores(config, data, adapter, aspects=None) -> tuple[list, list]:
    """The interview's answers in ``data`` and the trainer's own scores of them (transformers + peft, eval mode):
    the holistic score and ``aspects`` (default: all the part's), every one with ``adapter``."""
    import torch
    from peft import PeftModel

    from adapters.dataset import load_answers, read_jsonl
    from adapters.train import load_base_model, part_spec, score_answers
    from serve.grading.config import load_config

    cfg = load_config(config)
    answers, bad = load_answers(read_jsonl(data, "interview"), cfg.audio)
    assert not bad
    base, processor = load_base_model(cfg.model.base, torch.float32, "cpu")
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    spec = part_spec(cfg, "interview", processor.tokenizer)
    targets = None if aspects is None else tuple(a for a in spec.aspects if a.aspect in aspects)
    scored = score_answers(
        model, processor, spec, answers, batch_size=16, device="cpu", dtype=model.dtype, aspects=targets
    )
    return answers, scored


@pytest.mark.engine
def test_vllm_serves_what_the_trainer_learned(run):
    """The trainer's own evaluation (transformers + peft, eval mode) equals vLLM's scores of the same adapter."""
    answers, own = trainer_scores(run["cfg"], run["test"], run["adapter"])
    served = [json.loads(line) for line in (run["dir"] / "trained.jsonl").read_text().splitlines()]
    assert len(served) == len(own) == N_TEST
    for a, s, o in zip(answers, served, own):
        assert s["audio"] == str(a.example.audio)
        assert s["score"] == pytest.approx(o.score, abs=1e-3)
        assert (
            s["hard_score"] == o.hard_score
            or max(o.probabilities.values()) - sorted(o.probabilities.values())[-2] < 1e-3
        )


@pytest.mark.engine
def test_trained_adapter_is_a_serving_adapter(run):
    out = run["adapter"]
    check_adapter(out)
    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 16 and peft_cfg["bias"] == "none" and not peft_cfg.get("modules_to_save")
    assert not peft_cfg.get("use_dora")
    assert "language_model" in peft_cfg["target_modules"]
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["part"] == "interview" and [lv["label"] for lv in meta["levels"]] == list("ABCDEF")
    assert meta["training"]["loss"] == "fa" and meta["training"]["train_answers"] == N_TRAIN
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["finished"] and summary["final_loss"] < summary["first_loss"]
    assert summary["dev_final"]["soft"]["pcc"] > 0.6
    assert "trained 'interview' adapter" in run["train_stdout"]
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".language_model." in k for k in keys)


def test_interrupted_training_resumes_to_the_same_adapter(synth, tiny_dir, tmp_path):
    """A run stopped after some steps and resumed ends with the adapter of an uninterrupted run (ce loss)."""
    from safetensors.torch import load_file

    from adapters.train import TrainError, TrainOptions, train
    from serve.grading.config import load_config

    cfg = load_config(tiny_dir / "demo.yaml")
    subset = tmp_path / "small.jsonl"
    rows = [json.loads(line) for line in (synth / "train.jsonl").read_text().splitlines()[:24]]
    subset.write_text("".join(json.dumps({**r, "audio": str(synth / r["audio"])}) + "\n" for r in rows))
    base = dict(
        part="interview",
        data=str(subset),
        loss="ce",
        epochs=2,
        lr=1e-3,
        batch_size=8,
        dropout=0.0,
        save_every=2,
        progress=False,
    )
    whole = train(cfg, TrainOptions(out=str(tmp_path / "whole"), **base))
    first = train(cfg, TrainOptions(out=str(tmp_path / "split"), stop_after=4, **base))
    assert not first["finished"] and first["steps"] == 4
    assert not (tmp_path / "split" / "adapter_model.safetensors").exists()
    with pytest.raises(TrainError, match="--resume"):
        train(cfg, TrainOptions(out=str(tmp_path / "split"), **base))
    with pytest.raises(TrainError, match="differ"):
        train(cfg, TrainOptions(out=str(tmp_path / "split"), resume=True, **{**base, "lr": 5e-4}))
    resumed = train(cfg, TrainOptions(out=str(tmp_path / "split"), resume=True, **base))
    assert resumed["finished"] and resumed["steps"] == whole["steps"] == 6 and resumed["steps_this_run"] == 2
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-5)
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
    assert len(list((tmp_path / "split" / "checkpoints").glob("step-*"))) <= 2


# ---------------------------------------------------------------- analytic aspects

ASPECTS = ("fluency", "pronunciation", "language_use", "coherence")
#: The aspects the tiny random checkpoint learns as themselves from the synthetic speech within a CI budget, and the
#: held-out PCC each must reach (docs/training.md has the numbers of all four: on the part's shared adapter every
#: aspect but fluency follows fluency's truth; pronunciation is learned by an adapter of its own; word-level errors
#: and the answer's organisation are beyond a random 2-layer audio encoder either way).
LEARNABLE = {"fluency": 0.6, "pronunciation": 0.45}
ASPECT_TRAIN, ASPECT_TEST = 128, 48
ASPECT_FLAGS = ["--lr", "5e-3", "--epochs", "4", "--batch-size", "16", "--dropout", "0", "--rank", "16"]
#: pronunciation's own adapter: one target per chunk, so smaller batches and more steps for the same time
OWN_ASPECT_FLAGS = ["--lr", "5e-3", "--epochs", "6", "--batch-size", "8", "--dropout", "0", "--rank", "16"]


@pytest.fixture(scope="module")
def aspect_synth(tmp_path_factory) -> Path:
    require_espeak()
    d = tmp_path_factory.mktemp("aspect_synth")
    l2grader(
        "synth-data",
        str(d),
        "--aspects",
        "--n-train",
        str(ASPECT_TRAIN),
        "--n-dev",
        "0",
        "--n-test",
        str(ASPECT_TEST),
        "--seed",
        "2",
    )
    return d


@pytest.fixture(scope="module")
def aspect_run(aspect_synth, tiny_dir, tiny_config, tmp_path_factory) -> dict:
    """Train pronunciation's own adapter, then the interview's adapter for its holistic score and the other three
    aspects, and evaluate both through vLLM (one engine, the config naming each)."""
    import yaml

    d = tmp_path_factory.mktemp("aspect_run")
    t = time.time()
    own = train_interview(
        tiny_dir / "demo.yaml",
        aspect_synth / "train.jsonl",
        d / "pronunciation",
        "--aspect",
        "pronunciation",
        *OWN_ASPECT_FLAGS,
    )
    own_s = time.time() - t
    raw = tiny_config()
    raw["parts"]["interview"]["aspects"]["pronunciation"] = {"adapter": str(d / "pronunciation")}
    cfg = str(d / "aspects.yaml")
    Path(cfg).write_text(yaml.safe_dump(raw))
    t = time.time()
    trained = train_interview(cfg, aspect_synth / "train.jsonl", d / "adapter", *ASPECT_FLAGS)
    train_s = time.time() - t
    t = time.time()
    evaluated = l2grader(
        "evaluate",
        "--config",
        cfg,
        "--part",
        "interview",
        "--data",
        str(aspect_synth / "test.jsonl"),
        "--adapter",
        str(d / "adapter"),
        "--plot",
        str(d / "plot.png"),
        "--predictions",
        str(d / "predictions.jsonl"),
        "--report",
        str(d / "report"),
    )
    print(
        f"\naspect training: pronunciation's own {own_s:.1f} s, the part's {train_s:.1f} s; "
        f"evaluation {time.time() - t:.1f} s",
        file=sys.stderr,
    )
    return {
        "dir": d,
        "cfg": cfg,
        "adapter": d / "adapter",
        "own_adapter": d / "pronunciation",
        "summary": last_json(evaluated.stdout),
        "eval_stdout": evaluated.stdout,
        "train_stdout": trained.stdout,
        "own_stdout": own.stdout,
    }


def test_synth_aspects_are_independent_and_the_score_is_their_mean(aspect_synth):
    import numpy as np

    rows = [json.loads(line) for line in (aspect_synth / "train.jsonl").read_text().splitlines()]
    truth = np.array([[r["aspects"][a] for a in ASPECTS] for r in rows])
    assert truth.min() >= 1.0 and truth.max() <= 6.0
    for r in rows:
        assert r["score"] == pytest.approx(np.mean([r["aspects"][a] for a in ASPECTS]), abs=1e-3)
    corr = np.corrcoef(truth.T)
    assert np.abs(corr[np.triu_indices(4, 1)]).max() < 0.25, corr
    # each property follows its own aspect only: the speaking rate does not move with pronunciation, etc.
    prop = {
        "fluency": [r["synth"]["rate_wpm"] for r in rows],
        "pronunciation": [r["synth"]["accented_words"] / len(r["synth"]["text"].split()) for r in rows],
    }
    for a, values in prop.items():
        for b in ASPECTS:
            c = np.corrcoef(values, truth[:, ASPECTS.index(b)])[0, 1]
            assert abs(c) > 0.6 if a == b else abs(c) < 0.3, (a, b, c)


@pytest.mark.engine
def test_each_aspect_is_learned_as_itself(aspect_run):
    """Held out: each learnable aspect's scores follow its own human scores far more than any other aspect's."""
    summary = aspect_run["summary"]
    assert set(summary["aspects"]) == set(ASPECTS) and set(summary["aspect_cross_pcc"]) == set(ASPECTS)
    for a in ASPECTS:
        m = summary["aspects"][a]
        assert m["n"] == ASPECT_TEST and tuple(m["soft"]) == tuple(m["hard"]) == METRIC_KEYS
        assert set(summary["aspect_cross_pcc"][a]) == set(ASPECTS)
    cross = summary["aspect_cross_pcc"]
    table = "\n".join(f"{a:>14} " + " ".join(f"{cross[a][b]:7.3f}" for b in ASPECTS) for a in ASPECTS)
    print(f"\nheld-out aspect PCC (rows: predicted, columns: truth {ASPECTS}):\n{table}", file=sys.stderr)
    for a, floor in LEARNABLE.items():
        own = cross[a][a]
        assert own == summary["aspects"][a]["soft"]["pcc"]
        assert own >= floor, (a, own)
        for b in ASPECTS:
            if b != a:
                assert own >= abs(cross[a][b]) + 0.3, (a, b, cross[a])
    assert "aspect cross PCC" in aspect_run["eval_stdout"]
    html = (aspect_run["dir"] / "report" / "report.html").read_text()
    assert "<h2>Aspects</h2>" in html and all(a in html for a in ASPECTS)


@pytest.mark.engine
def test_vllm_serves_the_aspects_the_trainer_learned(aspect_run, aspect_synth):
    """The trainer's own evaluation of every aspect (transformers + peft), each with the adapter that learned it,
    equals vLLM's scores, which served both adapters side by side."""
    shared = tuple(a for a in ASPECTS if a != "pronunciation")
    test = aspect_synth / "test.jsonl"
    answers, own = trainer_scores(aspect_run["cfg"], test, aspect_run["adapter"], shared)
    _, own_pron = trainer_scores(aspect_run["cfg"], test, aspect_run["own_adapter"], ("pronunciation",))
    served = [json.loads(line) for line in (aspect_run["dir"] / "predictions.jsonl").read_text().splitlines()]
    assert len(served) == len(own) == len(own_pron) == ASPECT_TEST
    for a, s, o, p in zip(answers, served, own, own_pron):
        assert s["audio"] == str(a.example.audio)
        assert s["score"] == pytest.approx(o.score, abs=1e-3)
        mine = {**o.aspects, "pronunciation": p.aspects["pronunciation"]}
        assert set(s["aspects"]) == set(mine) == set(ASPECTS)
        for name, m in mine.items():
            assert s["aspects"][name]["score"] == pytest.approx(m.score, abs=1e-3), name
        assert s["aspects"]["pronunciation"]["adapter"].startswith("interview.pronunciation@")  # its own
        assert s["aspects"]["fluency"]["adapter"] == s["model"]["adapter"]  # the part's
    meta = json.loads((aspect_run["adapter"] / METADATA_FILE).read_text())
    # every scorable training answer has every aspect's score (an answer the speech check refuses is left out)
    assert meta["training"]["aspects"] == {a: meta["training"]["train_answers"] for a in shared}
    assert ASPECT_TRAIN - 3 <= meta["training"]["train_answers"] <= ASPECT_TRAIN
    summary = json.loads((aspect_run["adapter"] / "training_summary.json").read_text())
    assert summary["finished"] and summary["aspects"] == meta["training"]["aspects"]
    own_meta = json.loads((aspect_run["own_adapter"] / METADATA_FILE).read_text())
    assert own_meta["aspect"] == "pronunciation"
    assert own_meta["training"]["aspects"] == {"pronunciation": meta["training"]["train_answers"]}
