"""The ``serving:`` section belongs to the service: its schema checks it, the grading core keeps it as written.

Every ``l2grader`` command loads configs with the service's schema, so a
mistake under ``serving:`` is one error line in the same words as one
elsewhere in the file; its relative paths resolve against the config's folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve.cli.common import load_config_or_exit
from serve.grading.config import ConfigError, load_config
from serve.service.settings import load_service_config, part_registry

GOOD = "model: {base: m}\nparts:\n  interview: {task: Talk.}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grader.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "serving, message",
    [
        ("{prot: 8001}", "serving.prot: unknown key (did you mean 'port'?)"),
        (
            "{scorer: {autoscaling: {max_replica: 2}}}",
            "serving.scorer.autoscaling.max_replica: unknown key (did you mean 'max_replicas'?)",
        ),
        ("{port: 0}", "serving.port: Input should be greater than or equal to 1"),
        ("{trusted_proxies: [10.0.0.0/8, nope]}", "serving.trusted_proxies: Value error, 'nope' is not an IP address"),
        (
            "{ingress: {autoscaling: {min_replicas: 3, max_replicas: 2}}}",
            "serving.ingress.autoscaling: Value error, max_replicas must be at least min_replicas",
        ),
    ],
)
def test_serving_mistakes_are_one_line_at_every_command_and_unknown_to_grading(tmp_path, capsys, serving, message):
    path = write(tmp_path, GOOD + f"serving: {serving}\n")
    with pytest.raises(ConfigError) as e:
        load_service_config(path)
    assert str(e.value).startswith(f"config file {path} is invalid: {message}")

    with pytest.raises(SystemExit) as done:  # what every command (serve, score, score-session, train, ...) calls
        load_config_or_exit(str(path))
    assert done.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"l2grader: error: {e.value}"]

    # The grading core neither checks nor reads the section: engines and sessions take any grader config.
    assert load_config(path).serving == yaml.safe_load(serving)


def test_serving_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # not where the config lies
    d = tmp_path / "configs"
    d.mkdir()
    (d / "ads").mkdir()
    path = d / "grader.yaml"
    path.write_text(GOOD + "serving: {registry_file: state/r.json, adapter_roots: [ads, ~/more, /srv/adapters]}\n")
    cfg = load_service_config(path)
    assert cfg.serving.registry_file == d / "state" / "r.json"
    assert cfg.serving.adapter_roots == [d / "ads", home / "more", Path("/srv/adapters")]
    registry = part_registry(cfg, path)
    assert registry.path == d / "state" / "r.json"
    assert registry.adapter_roots()[0] == (d / "ads").resolve()

    path.write_text(GOOD)  # defaults: the registry beside the config, adapters from the config's adapter folders
    cfg = load_service_config(path)
    assert cfg.serving.registry_file is None and cfg.serving.adapter_roots is None
    assert part_registry(cfg, path).path == d / "grader.registry.json"
