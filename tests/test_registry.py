"""The part registry: admin changes persist, survive a restart, and other replicas see them."""

import json

import pytest
import yaml

from serve.grading.adapter_files import AdapterError
from serve.grading.config import PartConfig, UnknownPartError, load_config
from serve.grading.registry import PartRegistry, default_registry_file


@pytest.fixture()
def cfg_path(tiny_config, tmp_path):
    raw = tiny_config()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "c.yaml"


def test_changes_persist_across_restarts_and_replicas(cfg_path, tiny_dir):
    cfg = load_config(cfg_path)
    path = default_registry_file(cfg_path)
    assert path.name == "c.registry.json"
    a, b = PartRegistry(cfg, path), PartRegistry(cfg, path)  # two ingress replicas
    assert set(a.entries()) == {"interview", "long_turn"}
    before = a.get("interview").model_id
    assert before.startswith("interview@") and before.split("@")[1] == a.get("interview").adapter_hash

    a.put("opinion", PartConfig(adapter=tiny_dir / "adapters" / "long_turn", task="Opinion."))
    a.delete("interview")
    assert set(b.entries()) == {"long_turn", "opinion"}  # the other replica re-reads the file
    with pytest.raises(UnknownPartError):
        b.get("interview")
    restarted = PartRegistry(load_config(cfg_path), path)
    assert set(restarted.entries()) == {"long_turn", "opinion"}
    assert restarted.get("opinion").config.task == "Opinion."
    assert json.loads(path.read_text())["interview"] is None


def test_replacing_an_adapter_changes_the_model_id(cfg_path, tiny_dir):
    reg = PartRegistry(load_config(cfg_path), cfg_path.with_name("r.json"))
    old = reg.get("interview").model_id
    reg.put("interview", PartConfig(adapter=tiny_dir / "adapters" / "long_turn"))
    assert reg.get("interview").model_id != old
    reg.put("interview", PartConfig(adapter=None))
    assert reg.get("interview").model_id == "interview@base"


def test_bad_adapters_are_refused_before_anything_is_written(cfg_path, tmp_path):
    reg = PartRegistry(load_config(cfg_path), tmp_path / "r.json")
    with pytest.raises(AdapterError, match="does not exist"):
        reg.put("x", PartConfig(adapter=tmp_path / "missing"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="lacks adapter_model.safetensors"):
        reg.put("x", PartConfig(adapter=tmp_path / "half"))
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(UnknownPartError):
        reg.delete("nope")
