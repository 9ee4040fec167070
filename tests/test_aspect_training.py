"""Training analytic aspects, fast parts: aspect scores in the data, their agreement and cross matrix, and the
trainer's shared-prefix forward (rubric and audio once, each target's question on the cached keys), which must give
the numbers of one full prompt per target, gradients included.

The slow proof that each aspect is learned is in tests/test_training.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from adapters.agreement import aspect_agreement, format_aspects
from adapters.dataset import DataError, read_jsonl, train_items
from adapters.evaluate import human_aspects


def test_rows_carry_aspect_scores_and_reject_malformed_ones(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [
        {"audio": "a.wav", "score": 3.0, "aspects": {"fluency": 4.5, "pronunciation": 2}},
        {"audio": "b.wav", "score": 2.0, "voice": "en-us"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = read_jsonl(data)
    assert a.aspects == {"fluency": 4.5, "pronunciation": 2.0} and "aspects" not in a.fields
    assert b.aspects == {} and b.fields == {"voice": "en-us"}
    for bad in ({"fluency": "good"}, [4.5], 3):
        data.write_text(json.dumps({"audio": "a.wav", "score": 3.0, "aspects": bad}) + "\n")
        with pytest.raises(DataError, match="aspects"):
            read_jsonl(data)


def test_human_aspects_of_a_session_file_come_from_a_mapping_or_columns():
    assert human_aspects({"aspects": {"fluency": 3}, "l1": "de"}, "x") == {"fluency": 3.0}
    assert human_aspects({"aspects.fluency": 3, "aspects.coherence": None, "l1": "de"}, "x") == {"fluency": 3.0}
    assert human_aspects({"l1": "de"}, "x") == {}


def test_aspect_agreement_has_each_aspect_and_the_cross_matrix():
    rng = np.random.default_rng(0)
    truth = rng.uniform(1, 6, size=(50, 2))
    # fluency follows its own truth; pronunciation follows fluency's truth (learned as the wrong thing)
    predicted = [{"fluency": (f + 0.1, round(f)), "pronunciation": (f, round(f))} for f, _ in truth]
    human = [{"fluency": f, "pronunciation": p} for f, p in truth]
    human[0] = {"fluency": truth[0, 0]}  # an answer without a pronunciation score
    out = aspect_agreement(predicted, human)
    assert out["aspects"]["fluency"]["n"] == 50 and out["aspects"]["pronunciation"]["n"] == 49
    assert out["aspects"]["fluency"]["soft"]["pcc"] == pytest.approx(1.0)
    assert out["aspects"]["fluency"]["soft"]["rmse"] == pytest.approx(0.1)
    assert out["cross_pcc"]["pronunciation"]["fluency"] == pytest.approx(1.0)
    assert abs(out["cross_pcc"]["pronunciation"]["pronunciation"]) < 0.4
    lines = format_aspects(out)
    assert any(line.startswith("aspect fluency (50 answers)") for line in lines)
    assert aspect_agreement(predicted, [{} for _ in predicted]) == {"aspects": {}, "cross_pcc": {}}
    assert format_aspects({"aspects": {}, "cross_pcc": {}}) == []


def test_shared_prefix_gives_the_full_prompts_logits_and_gradients(tiny_dir, audio_dir):
    """One rubric+audio forward with each target's question on the cached keys equals one full prompt per target:
    logits and LoRA gradients, for a batch of chunks of different lengths where some lack some aspects."""
    import torch
    from peft import LoraConfig, get_peft_model

    from adapters.dataset import Answer, Example
    from adapters.train import load_base_model, part_spec, target_label_logits
    from serve.grading.adapter_files import LANGUAGE_MODEL_TARGETS
    from serve.grading.audio import prepare
    from serve.grading.config import load_config

    cfg = load_config(tiny_dir / "demo.yaml")
    answers = []
    for name, aspects in (("c.ogg", {"fluency": 2.0, "coherence": 5.0}), ("d.mp3", {}), ("c.ogg", {"fluency": 4.0})):
        prepared = prepare(audio_dir / name, cfg.audio)
        answers.append(Answer(Example(audio_dir / name, 3.0, aspects=aspects), tuple(prepared.chunks)))
    items = train_items(answers)
    model, processor = load_base_model(cfg.model.base)
    spec = part_spec(cfg, "interview", processor.tokenizer)
    model = get_peft_model(model, LoraConfig(r=8, lora_dropout=0.0, target_modules=LANGUAGE_MODEL_TARGETS))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.train()
    results = {}
    for share in (False, True):
        model.zero_grad()
        out = target_label_logits(model, processor, spec.targets, items, "cpu", torch.float32, share)
        sum((lg * torch.arange(1, lg.shape[1] + 1)).sum() for _, lg, _ in out).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results[share] = ([(t.aspect if hasattr(t, "aspect") else None, lg, s) for t, lg, s in out], grads)
    (full, g_full), (shared, g_shared) = results[False], results[True]
    # In the order of the aspects' ids; nobody has pronunciation or language use.
    assert [t for t, _, _ in shared] == [None, "coherence", "fluency"]
    assert [len(s) for _, _, s in shared] == [len(items), 1, sum(len(a.chunks) for a in (answers[0], answers[2]))]
    for (t, lg_f, s_f), (_, lg_s, s_s) in zip(full, shared):
        assert torch.equal(s_f, s_s), t
        assert (lg_f - lg_s).abs().max() < 1e-4, t
    assert g_full.norm() > 0
    assert ((g_full - g_shared).norm() / g_full.norm()).item() < 1e-4
    assert not math.isnan(g_shared.sum().item())


def test_an_aspect_trains_an_adapter_of_its_own_that_serving_scores_it_with(tiny_dir, tiny_config, audio_dir, tmp_path):
    """``train --aspect A``: an adapter for A alone, from the answers with A's score, that the config names as A's
    adapter; an aspect the part lacks, or data without its scores, fail before any training."""
    import yaml

    from adapters.train import TrainError, TrainOptions, train
    from serve.grading.adapter_files import METADATA_FILE
    from serve.grading.config import load_config
    from serve.grading.parts import config_parts

    cfg = load_config(tiny_dir / "demo.yaml")
    data = tmp_path / "d.jsonl"
    rows = [
        {"audio": str(audio_dir / "c.ogg"), "score": 3.0, "aspects": {"pronunciation": 2.0, "fluency": 5.0}},
        {"audio": str(audio_dir / "d.mp3"), "score": 4.0, "aspects": {"pronunciation": 5.5, "fluency": 1.5}},
        {"audio": str(audio_dir / "c.ogg"), "score": 2.0},  # no pronunciation score: left out
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = dict(part="interview", data=str(data), epochs=1, batch_size=2, lr=1e-3, progress=False)
    with pytest.raises(TrainError, match="no aspect 'accent'.*coherence, fluency, language_use, pronunciation"):
        train(cfg, TrainOptions(out=str(tmp_path / "x"), aspect="accent", **opts))
    with pytest.raises(TrainError, match="no usable answers of part 'interview' with a coherence score"):
        train(cfg, TrainOptions(out=str(tmp_path / "y"), aspect="coherence", **opts))

    out = tmp_path / "pron"
    summary = train(cfg, TrainOptions(out=str(out), aspect="pronunciation", dev=str(data), **opts))
    assert (
        summary["aspect"] == "pronunciation"
        and summary["train_answers"] == 2
        and summary["aspects"] == {"pronunciation": 2}
    )
    final = summary["dev_final"]  # the dev metrics are the aspect's, held against every aspect's truth
    assert final["n"] == 2 and final["soft"] == final["aspects"]["pronunciation"]["soft"]
    assert set(final["cross_pcc"]) == {"pronunciation"} and set(final["cross_pcc"]["pronunciation"]) == {
        "pronunciation",
        "fluency",
    }
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["part"] == "interview" and meta["aspect"] == "pronunciation"
    preds = [json.loads(line) for line in (out / "dev_predictions.jsonl").read_text().splitlines()]
    assert [p["human"] for p in preds] == [2.0, 5.5] and all(1.0 <= p["score"] <= 6.0 for p in preds)

    # Named in the config, it scores pronunciation; the part's adapter still scores the other aspects.
    raw = tiny_config()  # absolute paths
    raw["parts"]["interview"]["aspects"] = {"fluency": {}, "pronunciation": {"adapter": str(out)}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    part = config_parts(load_config(tmp_path / "c.yaml"))["interview"]
    own = dict(part.aspect_adapters)
    assert set(own) == {"pronunciation"} and own["pronunciation"].path.resolve() == out.resolve()
