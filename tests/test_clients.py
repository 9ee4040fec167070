"""The API as strangers meet it: its docs in a browser with no network, and clients generated from its document.

The real Serve application on the fake engine of tests/test_scorer.py, behind
real HTTP (its ``url`` fixture, one service for the module). ``/docs`` opens
in headless Chromium whose every request away from the service goes to a dead
proxy; the browser's own log must show none was tried.
Then a Python client (openapi-python-client) and a TypeScript client
(openapi-typescript types with openapi-fetch, compiled by tsc and run by Node)
are generated from the service's ``/openapi.json`` as published, with no edit,
and each scores an answer as multipart and as JSON and reads a 404 as the
``ErrorResponse`` model. A missing Chromium, generator or Node skips its test
with the reason, except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.test_scorer import cfg_path, url, wav  # noqa: F401  (the module's service)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CEFR = {"A1", "A2", "B1", "B2", "C1", "C2"}
#: The TypeScript client's tools, pinned (installed by the test into a temporary folder, not into the project).
#: TypeScript stays at 5 (docs/api.md): openapi-typescript builds its output with TypeScript's JavaScript compiler
#: API, which TypeScript 7 does not ship, and peers on ``typescript@^5.x``.
NPM_PACKAGES = ["openapi-typescript@7.13.0", "openapi-fetch@0.17.0", "typescript@5.9.3", "@types/node@20"]
#: Operations the docs page must show (method and path as Swagger UI writes them).
OPERATIONS = {("POST", "/v1/score"), ("POST", "/v1/score/json"), ("POST", "/v1/score/batch"), ("GET", "/v1/parts")}


def missing(what: str) -> None:
    """Skip for a missing tool, but fail under CI, which must run every check here."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {what}")
    pytest.skip(what)


@pytest.fixture(scope="module")
def document(url) -> dict:  # noqa: F811
    return httpx.get(f"{url}/openapi.json", timeout=30).json()


def test_every_operation_declares_one_body_type(document):
    """One content type per request body: generators mishandle two (openapi-python-client #1451)."""
    ops = [op for item in document["paths"].values() for op in item.values() if "requestBody" in op]
    assert ops and all(len(op["requestBody"]["content"]) == 1 for op in ops)
    assert {op["operationId"] for op in ops} == {"score", "score_json", "score_batch", "put_part"}


# ---------------------------------------------------------------- /docs with the network cut


@pytest.fixture(scope="module")
def offline_browser(tmp_path_factory):
    """Headless Chromium that can reach loopback only (everything else goes to a dead proxy), logging requests."""
    if not all(os.access(p, os.X_OK) for p in (CHROMIUM, CHROMEDRIVER)):
        missing("chromium and chromedriver missing (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("the selenium package is missing (pip install -e .[test])")
    d = tmp_path_factory.mktemp("offline-chromium")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--proxy-server=http://127.0.0.1:9",  # nothing listens there; loopback is never proxied
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={d / 'profile'}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(d / "chromedriver.log"))
    drv = webdriver.Chrome(options=opts, service=service)
    try:
        drv.set_page_load_timeout(60)
        yield drv
    finally:
        try:
            drv.quit()
        finally:
            service.stop()
            shutil.rmtree(d / "profile", ignore_errors=True)


def requested_urls(drv) -> list[str]:
    """Every URL the browser asked for since the last call (from its performance log)."""
    urls = []
    for entry in drv.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def away(urls: list[str], base: str) -> list[str]:
    """The requests that would leave the machine (the browser's own chrome:// pages never do)."""
    return [
        u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:", "ftp:")) and not u.startswith(base + "/")
    ]


def test_swagger_ui_renders_every_operation_offline(url, offline_browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    drv = offline_browser
    drv.get(f"{url}/docs")
    WebDriverWait(drv, 60, 0.25).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= len(OPERATIONS))
    shown = {
        (op.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text, path.get_attribute("data-path"))
        for op in drv.find_elements(By.CSS_SELECTOR, ".opblock-summary")
        for path in op.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    assert OPERATIONS <= shown
    urls = requested_urls(drv)
    assert f"{url}/openapi.json" in urls and any(u.endswith("swagger-ui-bundle.js") for u in urls)
    assert away(urls, url) == []


def test_redoc_is_not_served(url):  # noqa: F811
    """ReDoc fetches its logo from its maker's CDN: only Swagger UI, which fetches nothing, is served."""
    assert httpx.get(f"{url}/redoc", timeout=30).status_code == 404


# ---------------------------------------------------------------- generated clients


@pytest.fixture(scope="module")
def answer_wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("answer") / "answer.wav"
    path.write_bytes(wav(4, seed=3))
    return path


@pytest.fixture(scope="module")
def document_file(document, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("document") / "openapi.json"
    path.write_text(json.dumps(document))
    return path


def test_generated_python_client_scores_and_reads_errors(url, document_file, answer_wav, tmp_path):  # noqa: F811
    generator = Path(sys.executable).with_name("openapi-python-client")
    if not generator.exists():
        missing("openapi-python-client is missing (pip install -e .[test])")
    out = tmp_path / "l2grader_client"
    run = subprocess.run(
        [str(generator), "generate", "--path", str(document_file), "--meta", "none", "--output-path", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Warning" not in run.stdout + run.stderr, run.stdout + run.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        pkg = importlib.import_module("l2grader_client")
        score = importlib.import_module("l2grader_client.api.default.score")
        score_json = importlib.import_module("l2grader_client.api.default.score_json")
        models = importlib.import_module("l2grader_client.models")
        types = importlib.import_module("l2grader_client.types")
    finally:
        sys.path.remove(str(tmp_path))
    audio = answer_wav.read_bytes()
    with pkg.Client(base_url=url, timeout=httpx.Timeout(60)) as client:
        upload = models.ScoreScoreUpload(
            part="interview",
            audio=types.File(payload=answer_wav.open("rb"), file_name="answer.wav", mime_type="audio/wav"),
            response_id="py-multipart",
        )
        multipart = score.sync(client=client, body=upload)
        as_json = score_json.sync(
            client=client,
            body=models.ScoreJsonScoreRequest(
                part="interview", audio_base64=base64.b64encode(audio).decode(), response_id="py-json"
            ),
        )
        unknown = score_json.sync_detailed(
            client=client, body=models.ScoreJsonScoreRequest(part="no_such_part", audio_base64="AAAA")
        )
    for got, rid in ((multipart, "py-multipart"), (as_json, "py-json")):
        assert isinstance(got, models.ScoreResponse), got
        assert got.part == "interview" and got.response_id == rid and got.cefr in CEFR
        assert abs(sum(got.probabilities.to_dict().values()) - 1) < 1e-3
    assert unknown.status_code == 404 and isinstance(unknown.parsed, models.ErrorResponse)
    assert unknown.parsed.error.kind == "unknown_part" and "no_such_part" in unknown.parsed.error.message


TS_CLIENT = """\
import { readFileSync } from "node:fs";
import createClient from "openapi-fetch";
import type { components, paths } from "./api.js";

type Score = components["schemas"]["ScoreResponse"];
type Failure = components["schemas"]["ErrorResponse"];

const [baseUrl, wavPath] = process.argv.slice(2);
const client = createClient<paths>({ baseUrl });
const audio = readFileSync(wavPath);

const multipart = await client.POST("/v1/score", {
  // the document says `format: binary`: openapi-typescript types it as a string, the form takes a Blob
  body: {
    part: "interview",
    audio: new Blob([audio], { type: "audio/wav" }) as unknown as string,
    response_id: "ts-multipart",
  },
  bodySerializer(body: Record<string, unknown>) {
    const form = new FormData();
    for (const [key, value] of Object.entries(body)) form.append(key, value as string | Blob);
    return form;
  },
});
const json = await client.POST("/v1/score/json", {
  body: { part: "interview", audio_base64: audio.toString("base64"), response_id: "ts-json" },
});
const unknown = await client.POST("/v1/score/json", { body: { part: "no_such_part", audio_base64: "AAAA" } });
const failure: Failure | undefined = unknown.error;
const scores: (Score | undefined)[] = [multipart.data, json.data];
console.log(JSON.stringify({ scores, status: unknown.response.status, failure }));
"""


def test_generated_typescript_client_scores_and_reads_errors(url, document_file, answer_wav, tmp_path):  # noqa: F811
    npm, node = shutil.which("npm"), shutil.which("node")
    if not (npm and node):
        missing("Node.js and npm are missing (the TypeScript client is generated and run with them)")
    install = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(tmp_path), *NPM_PACKAGES],
        capture_output=True,
        text=True,
        timeout=400,
    )
    if install.returncode != 0:
        missing(f"npm could not install {' '.join(NPM_PACKAGES)}: {install.stderr[-500:]}")
    bins = tmp_path / "node_modules" / ".bin"

    def run(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(cmd)}: {done.stdout}{done.stderr}"
        return done.stdout

    run(str(bins / "openapi-typescript"), str(document_file), "-o", "api.d.ts")
    (tmp_path / "client.ts").write_text(TS_CLIENT)
    (tmp_path / "package.json").write_text(json.dumps({"type": "module", "private": True}))
    run(
        str(bins / "tsc"),
        *("--strict", "--target", "es2022", "--module", "nodenext", "--moduleResolution", "nodenext"),
        *("--types", "node", "--outDir", "out", "client.ts"),
    )
    got = json.loads(run(node, "out/client.js", url, str(answer_wav)))
    for score, rid in zip(got["scores"], ("ts-multipart", "ts-json")):
        assert score["part"] == "interview" and score["response_id"] == rid and score["cefr"] in CEFR
        assert abs(sum(score["probabilities"].values()) - 1) < 1e-3
    assert got["status"] == 404 and got["failure"]["error"]["kind"] == "unknown_part"
