"""The generated checkpoint: published layout, deterministic, loads in transformers, adapters non-zero."""

import hashlib
import json

import pytest
from safetensors import safe_open

from adapters.tiny_model import DEMO_PARTS, make_tiny_model
from serve.grading.adapter_files import LANGUAGE_MODEL_TARGETS, METADATA_FILE, check_adapter
from serve.grading.config import load_config
from serve.grading.levels import DEFAULT_LEVELS
from serve.grading.parts import LabelTokenError, label_token_ids, resolve_parts


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_and_size(tiny_dir):
    model = tiny_dir / "model"
    with safe_open(model / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"audio_tower", "multi_modal_projector", "language_model"}
    assert "language_model.lm_head.weight" in keys
    assert any(k.startswith("language_model.model.layers.0.") for k in keys)
    size = sum(p.stat().st_size for p in model.iterdir())
    assert size < 3_000_000
    assert (model / "UNTRAINED.txt").exists()


def test_deterministic_from_seed(tiny_dir, tmp_path):
    again = make_tiny_model(tmp_path / "again")
    for rel in ["model/model.safetensors", "model/tokenizer.json", "adapters/interview/adapter_model.safetensors"]:
        assert digest(tiny_dir / rel) == digest(again / rel), rel
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert digest(tiny_dir / "model/model.safetensors") != digest(other / "model/model.safetensors")


def test_demo_adapters_are_nonzero_and_distinct(tiny_dir):
    hashes = set()
    for part in DEMO_PARTS:
        d = tiny_dir / "adapters" / part
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["r"] == 16 and cfg["target_modules"] == LANGUAGE_MODEL_TARGETS
        with safe_open(d / "adapter_model.safetensors", "pt") as f:
            names = list(f.keys())
            assert names and all("language_model" in n for n in names)
            assert all(f.get_tensor(n).abs().sum() > 0 for n in names)
        assert json.loads((d / METADATA_FILE).read_text())["part"] == part
        hashes.add(check_adapter(d).content_hash)
    assert len(hashes) == len(DEMO_PARTS)


def test_loads_in_transformers_and_labels_are_single_tokens(tiny_dir):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_dir / "model")
    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_dir / "model")
    lm_head = model.get_output_embeddings().weight
    with safe_open(tiny_dir / "model" / "model.safetensors", "pt") as f:
        assert (lm_head == f.get_tensor("language_model.lm_head.weight")).all()  # loaded, not re-initialised
    cfg = load_config(tiny_dir / "demo.yaml")
    specs = resolve_parts(cfg, processor.tokenizer)
    assert all(len(s.label_token_ids) == len(DEFAULT_LEVELS) for s in specs.values())


def test_multi_token_label_fails_clearly(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    bad = (DEFAULT_LEVELS[0].model_copy(update={"label": "Zq9"}),) + DEFAULT_LEVELS[1:]
    with pytest.raises(LabelTokenError, match="'Zq9'.*single token"):
        label_token_ids(tok, bad)
