from pathlib import Path

import pytest
import soundfile as sf
import yaml

from adapters.tiny_model import DEMO_ASPECTS, DEMO_PARTS, demo_config_dict
from serve.grading.config import ConfigError, UnknownPartError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_validate():
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.model.untrained and set(demo.parts) == set(DEMO_PARTS)
    assert demo.model.base == str(REPO / "models" / "tiny" / "model")
    assert demo.parts["interview"].adapter == REPO / "models" / "tiny" / "adapters" / "interview"
    sample_s = sf.info(REPO / "docs" / "sample-answer.wav").duration  # the README's interview answer
    review = demo.parts["interview"].review
    assert review.min_duration_s <= sample_s <= review.max_duration_s and demo.parts["long_turn"].review.max_duration_s
    real = load_config(REPO / "configs" / "qwen2-audio-7b.yaml")
    assert real.model.base == "Qwen/Qwen2-Audio-7B-Instruct"  # hub id kept as is
    assert real.engine.dtype == "bfloat16" and not real.model.untrained


def test_aspects_are_filled_in_from_the_built_ins_and_resolve_beside_the_config(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "model: {base: m}\nparts:\n  p:\n    aspects:\n      fluency: {}\n"
        "      grit: {description: 'how the candidate keeps going.', adapter: a/grit,\n"
        "             levels: [{label: L, cefr: A2, score: 2, descriptor: low}, {label: H, cefr: B2, score: 4, "
        "descriptor: high}]}\n"
    )
    part = load_config(tmp_path / "c.yaml").parts["p"]
    fluency, grit = part.aspects["fluency"], part.aspects["grit"]
    assert [lv.label for lv in fluency.levels] == [lv.label for lv in part.levels] and fluency.adapter is None
    assert fluency.levels[0].descriptor != part.levels[0].descriptor and "pauses" in fluency.description
    assert [lv.label for lv in grit.levels] == ["L", "H"] and grit.adapter == (tmp_path / "a" / "grit").resolve()


def test_repo_demo_config_is_the_generated_one():
    shipped = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    own = [a for aspects in DEMO_ASPECTS.values() for a in aspects.values() if a]
    names = [*DEMO_PARTS, *own]
    expected = demo_config_dict("../models/tiny/model", {n: f"../models/tiny/adapters/{n}" for n in names})
    assert shipped == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: {base: m}\nparts: {}\n", "parts"),
        ("model: {base: m}\nparts: {p: {}}\nengine: {max_lora_rank: 12}\n", "max_lora_rank"),
        ("model: {base: m}\nparts: {p: {}}\nengine: {max_loras: 8, max_cpu_loras: 2}\n", "max_cpu_loras"),
        ("model: {base: m}\nparts: {p: {}}\nengine: {dtyp: float32}\n", "engine.dtyp"),
        ("model: {base: m}\nparts: {'a b': {}}\n", "part id"),
        ("parts: {p: {}}\n", "model"),
        ("model: [\n", "not valid YAML"),
        ("- 1\n", "must hold a mapping"),
        (
            "model: {base: m}\nparts: {p: {levels: [{label: A, cefr: A1, score: 1, descriptor: x},"
            " {label: A, cefr: A2, score: 2, descriptor: y}]}}\n",
            "labels must be unique",
        ),
        ("model: {base: m}\nparts: {p: {aspects: [grit]}}\n", "aspect 'grit' is not built in"),
        ("model: {base: m}\nparts: {p: {aspects: {'a b': {}}}}\n", "aspect id 'a b'"),
        ("model: {base: m}\nparts: {p: {aspects: [fluency, fluency]}}\n", "listed more than once"),
        ("model: {base: m}\nparts: {p: {aspects: [" + ", ".join(f"x{i}" for i in range(9)) + "]}}\n", "at most 8"),
        ("model: {base: m}\nparts: {p: {aspects: {fluency: {adaptr: x}}}}\n", "parts.p.aspects.fluency.adaptr"),
        (
            "model: {base: m}\nparts: {p: {levels: [{label: A, cefr: X1, score: 1, descriptor: x},"
            " {label: B, cefr: X2, score: 2, descriptor: y}], aspects: [fluency]}}\n",
            "no built-in descriptor",
        ),
    ],
)
def test_invalid_configs_say_where(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_relative_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    cfg = load_config(write(tmp_path, "model: {base: m}\nparts: {p: {adapter: ad/p}}\n"))
    assert cfg.model.base == str(tmp_path / "m")
    assert cfg.parts["p"].adapter == tmp_path / "ad" / "p"
    with pytest.raises(UnknownPartError, match="known parts: p"):
        cfg.part("q")


# ---------------------------------------------------------------- keys named twice


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("model: {base: m}\nserving:\n  port: 8001\nparts: {p: {}}\nserving:\n  port: 8002\n", "serving", (2, 5)),
        ("model: {base: m}\nparts:\n  p:\n    task: One.\n    levels: []\n    task: Two.\n", "task", (4, 6)),
        ("model: {base: m}\nparts:\n  p: {}\n  q: {}\n  p: {task: x}\n", "p", (3, 5)),
        ("model: {base: m, base: n}\nparts: {p: {}}\n", "base", (1, 1)),
    ],
)
def test_a_key_named_twice_is_refused_with_both_lines(tmp_path, text, key, lines):
    """PyYAML keeps the last of two equal keys: a second `serving:` section silently replaced the first."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    message = str(e.value)
    assert f"key {key!r} appears twice in one mapping (lines {lines[0]} and {lines[1]})" in message, message
    assert message.startswith(f"config file {tmp_path / 'c.yaml'} is not valid YAML at line {lines[1]}, column ")
    assert "\n" not in message


def test_a_merge_may_still_override_the_keys_it_brings(tmp_path):
    text = "model: {base: m}\nparts:\n  p: &p {task: Talk.}\n  q:\n    <<: *p\n    task: Talk more.\n"
    assert load_config(write(tmp_path, text)).parts["q"].task == "Talk more."


# ---------------------------------------------------------------- unknown parts: the one they may have meant


def test_an_unknown_part_names_the_part_it_may_have_meant_at_every_door(tmp_path):
    from serve.grading.parts import config_parts
    from serve.grading.registry import PartRegistry
    from serve.session.stages import _row_error

    cfg = load_config(write(tmp_path, "model: {base: m}\nparts: {interview: {}, long_turn: {}}\n"))
    with pytest.raises(UnknownPartError) as e:
        cfg.part("intervew")
    assert str(e.value) == "unknown part 'intervew' (did you mean 'interview'? known parts: interview, long_turn)"
    with pytest.raises(UnknownPartError) as e:  # the registry (HTTP, command line) lists where each part comes from
        PartRegistry(cfg, tmp_path / "registry.json").get("long-turn")
    assert str(e.value) == (
        "unknown part 'long-turn' (did you mean 'long_turn'? known parts: interview (config), long_turn (config))"
    )
    row = {"candidate_id": "c1", "part": "Interview", "audio": "a.wav"}
    error = _row_error(row, config_parts(cfg))  # a session's manifest row
    assert error is not None and error.kind == "unknown_part"
    assert "(did you mean 'interview'? known parts: interview, long_turn)" in str(error)
    with pytest.raises(UnknownPartError) as e:  # nothing near: no guess
        cfg.part("speaking")
    assert str(e.value) == "unknown part 'speaking' (known parts: interview, long_turn)"
