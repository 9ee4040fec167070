"""Config errors in the project's words: an unknown key names the nearest known one, a broken YAML file its line.

Both through :func:`serve.grading.config.load_config` and as the one error line
``l2grader`` prints (``serve-config`` loads the config and nothing else).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.grading.config import ConfigError, load_config
from serve.service.settings import load_service_config

REPO = Path(__file__).resolve().parents[1]
GOOD = "model: {base: m}\nengine: {max_model_len: 2048}\nparts:\n  interview: {task: Talk.}\n"


def config_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "grader.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return str(e.value)


@pytest.mark.parametrize(
    "text, where, suggestion",
    [
        (GOOD.replace("parts:", "partz:"), "partz", "parts"),
        (GOOD.replace("max_model_len", "max_model_ln"), "engine.max_model_ln", "max_model_len"),
        (GOOD.replace("task:", "tsak:"), "parts.interview.tsak", "task"),
        (GOOD + "audio: {max_upload_mbs: 3}\n", "audio.max_upload_mbs", "max_upload_mb"),
    ],
)
def test_an_unknown_key_names_the_nearest_known_one(tmp_path, text, where, suggestion):
    message = config_error(tmp_path, text)
    assert f"{where}: unknown key (did you mean {suggestion!r}?)" in message
    assert "Extra inputs" not in message and "\n" not in message


def test_a_key_that_moved_to_the_serving_section_says_where(tmp_path):
    message = config_error(tmp_path, GOOD + "audio: {max_batch_answers: 8}\n")
    assert message.endswith("audio.max_batch_answers: moved to serving.max_batch_answers")
    moved = tmp_path / "moved.yaml"
    moved.write_text(GOOD + "serving: {max_batch_answers: 8}\n")
    assert load_service_config(moved).serving.max_batch_answers == 8


def test_an_unknown_key_far_from_any_gets_no_guess(tmp_path):
    message = config_error(tmp_path, GOOD + "colour: blue\n")
    assert message.endswith("colour: unknown key")


def test_a_missing_key_is_named(tmp_path):
    assert "parts: required, but missing" in config_error(tmp_path, "model: {base: m}\n")


def test_broken_yaml_names_the_file_and_line(tmp_path):
    message = config_error(tmp_path, GOOD + "audio: [1, 2\nserving: {}\n")
    path = tmp_path / "grader.yaml"
    assert message.startswith(f"config file {path} is not valid YAML at line 6, column ")
    assert "<unicode string>" not in message and "\n" not in message


def test_the_cli_prints_one_line(tmp_path):
    path = tmp_path / "grader.yaml"
    path.write_text(GOOD.replace("task:", "tsak:"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "serve.cli", "serve-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"l2grader: error: config file {path} is invalid: parts.interview.tsak: unknown key (did you mean 'task'?)"
    ]
