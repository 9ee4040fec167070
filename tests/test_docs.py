"""The documentation site builds in strict mode (a broken link, anchor or missing page fails), its API reference
is the service's own OpenAPI document, and the README's links and sample answer exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_readme_links_resolve():
    readme = (REPO / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", readme) if "://" not in t]
    assert targets and [t for t in targets if not (REPO / t).exists()] == []
    assert "docs/sample-answer.wav" in readme and (REPO / "docs" / "sample-answer.wav").stat().st_size > 10_000


def test_site_builds_strict_with_the_api_reference(tmp_path):
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
    except ImportError:
        why = "mkdocs and mkdocs-material are missing (pip install -e .[test])"
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the docs: {why}")
        pytest.skip(why)
    from serve.service.app import ingress_class
    from serve.service.ingress import app

    ingress_class()
    app.openapi_schema = None
    doc = app.openapi()
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_MKDOCS_2_WARNING": "1"}
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(site)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference = (site / "api-reference" / "index.html").read_text()
    operations = [(m.upper(), p, op["operationId"]) for p, item in doc["paths"].items() for m, op in item.items()]
    assert len(operations) >= 8
    for method, path, op_id in operations:
        assert f"{method} {path}" in reference and op_id in reference, (method, path)
    for schema in doc["components"]["schemas"]:
        assert f'id="{schema.lower()}"' in reference, schema
    for page in ("usage", "api", "operating", "trust", "training", "speak-and-improve", "benchmarks", "architecture"):
        assert (site / page / "index.html").exists(), page
