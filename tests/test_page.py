"""The page at ``/`` in a real browser: headless Chromium (Debian's, through ChromeDriver) against the real service.

The service is the run's one real service (tests/conftest.py: tiny checkpoint, API keys).
Chromium's fake microphone plays a generated speech-like WAV, so the page's
Record / Stop path (getUserMedia + MediaRecorder) runs for real; a second flow
chooses a file, a third records, then chooses a noisy, clipped file instead.
The service's review looks at audio quality only here (the model-side
thresholds are off: on the untrained tiny model they fire at random), so a
clean answer needs no review and the noisy one does, for known reasons.
Without Chromium the module is skipped, except under CI (``CI`` set), where it
fails. ``L2GRADER_SCREENSHOT=1`` saves the page with the noisy answer's verdict
to ``docs/page.png`` (the README's picture).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from serve.grading.results import Quality
from tests.audio_fixtures import speechlike, write
from tests.conftest import ADMIN, USER, USER_KEY

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCORE_WAIT_S = 120
CEFR = {"A1", "A2", "B1", "B2", "C1", "C2"}
#: Review on audio quality only: the untrained model's uncertainty says nothing, so its checks are off.
QUALITY_ONLY_REVIEW = {"max_score_sd": None, "min_label_mass": None, "max_chunk_spread": None, "max_aspect_gap": None}
QUALITY_FIELDS = list(Quality.model_fields)  # every figure of the answer's quality, in the model's order
UNCERTAINTY_FIELDS = ["score_sd", "entropy", "label_mass", "chunk_spread"]
#: The demo interview's aspects, as the page names them.
ASPECT_NAMES = {
    "fluency": "Fluency",
    "pronunciation": "Pronunciation",
    "language_use": "Language use",
    "coherence": "Coherence",
}


@pytest.fixture(scope="module")
def browser_bins() -> tuple[str, str]:
    """Chromium and ChromeDriver; skip without them (fail under CI, which must run this module)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = f"{', '.join(missing)} missing (apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {why}")
        pytest.skip(why)
    return CHROMIUM, CHROMEDRIVER


#: The part the page scores: the demo interview (its adapter, task and aspects), reviewing on audio quality only.
PAGE_PART = "page_interview"


@pytest.fixture(scope="module")
def base_url(browser_bins, real_service, tiny_config):
    """The shared real service (API keys configured) with :data:`PAGE_PART` added by an admin (and removed after
    the module), so that what the page shows does not hang on the untrained model's uncertainty."""
    interview = tiny_config()["parts"]["interview"]
    body = {**interview, "review": dict(QUALITY_ONLY_REVIEW)}
    r = httpx.put(f"{real_service.url}/v1/parts/{PAGE_PART}", headers=ADMIN, json=body, timeout=300)
    assert r.status_code == 200, r.text
    try:
        yield real_service.url
    finally:
        httpx.delete(f"{real_service.url}/v1/parts/{PAGE_PART}", headers=ADMIN, timeout=60)


@pytest.fixture(scope="module")
def driver(browser_bins, base_url, tmp_path_factory):
    """Headless Chromium whose fake microphone plays a 6 s speech-like WAV; Chromium and ChromeDriver end with it."""
    import psutil
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    d = tmp_path_factory.mktemp("chromium")
    mic = write(d / "mic.wav", 6, 16000, seed=31)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser_bins[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic}",
        f"--user-data-dir={d / 'profile'}",
        "--window-size=1000,1350",
    ):
        opts.add_argument(arg)
    service = Service(executable_path=browser_bins[1], log_output=str(d / "chromedriver.log"))
    drv = webdriver.Chrome(options=opts, service=service)
    procs = psutil.Process(service.process.pid).children(recursive=True)  # Chromium's processes
    try:
        drv.set_page_load_timeout(60)
        drv.set_script_timeout(60)
        yield drv
    finally:
        try:
            drv.quit()  # closes Chromium and stops ChromeDriver
        finally:
            service.stop()
            for p in procs:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            shutil.rmtree(d / "profile", ignore_errors=True)


def wait_for(drv, condition, timeout: float, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(drv, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        raise AssertionError(
            f"timed out after {timeout:g} s waiting for {what}; status: {text(drv, 'status')!r}, "
            f"error: {text(drv, 'error')!r}"
        ) from None


def text(drv, element_id: str) -> str:
    return drv.find_element("id", element_id).text


def open_page(drv, url: str) -> None:
    """Load the page, see the API's 401 shown as text, type the key, wait for the parts, pick :data:`PAGE_PART`."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    drv.get(f"{url}/")
    assert "API key (if the service requires one)" in drv.find_element("css selector", "label[for=api-key]").text
    # the untrained warning comes from /readyz (no key needed) on load, before any answer is scored
    wait_for(drv, lambda d: d.find_element("id", "untrained").is_displayed(), 20, "the untrained warning on load")
    assert "untrained demo model: scores mean nothing" in text(drv, "untrained")
    assert not drv.find_element("id", "result").is_displayed() and not drv.execute_script("return window.lastResult")
    wait_for(drv, lambda d: text(d, "error"), 20, "the 401 of /v1/parts without a key")
    assert re.match(r"cannot list the parts: 401 \w+: ", text(drv, "error")), text(drv, "error")
    drv.find_element("id", "api-key").send_keys(USER_KEY, Keys.TAB)  # change event: parts reload with the key
    wait_for(drv, lambda d: len(Select(d.find_element("id", "part")).options) >= 2, 20, "the part selector")
    assert not drv.find_element("id", "error").is_displayed()
    Select(drv.find_element("id", "part")).select_by_value(PAGE_PART)


def submit_and_wait(drv) -> dict:
    """Click submit, wait (bounded) for a score, return the service's answer as the page holds it."""
    drv.find_element("id", "submit").click()
    wait_for(
        drv,
        lambda d: re.fullmatch(r"\d+\.\d\d", text(d, "score")) or d.find_element("id", "error").is_displayed(),
        SCORE_WAIT_S,
        "a score",
    )
    assert not drv.find_element("id", "error").is_displayed(), text(drv, "error")
    return drv.execute_script("return window.lastResult")


def check_result(drv, url: str, result: dict) -> None:
    labels = httpx.get(f"{url}/v1/parts", headers=USER, timeout=30).json()["parts"]
    labels = next(p["labels"] for p in labels if p["part"] == PAGE_PART)
    assert result["part"] == PAGE_PART
    assert text(drv, "score") == f"{result['score']:.2f}"
    assert text(drv, "cefr") in CEFR and text(drv, "cefr") == result["cefr"]
    assert text(drv, "duration") == f"{result['duration_s']:.1f} s"
    bars = drv.find_elements("css selector", "#bars .bar")
    assert len(bars) == len(labels) == len(result["probabilities"])
    assert set(result["label_cefr"]) == set(result["probabilities"]) and set(result["label_cefr"].values()) <= CEFR
    assert [b.find_element("css selector", ".label").text for b in bars] == [
        f"{label} · {result['label_cefr'][label]}" for label in result["probabilities"]
    ]  # each label beside its CEFR name, e.g. "A · A1"
    chunks = drv.find_elements("css selector", "#chunks .chunk")
    assert len(chunks) == len(result["chunks"]) >= 1
    assert drv.find_element("id", "untrained").is_displayed()  # the tiny checkpoint is untrained
    assert "untrained demo model: scores mean nothing" in text(drv, "untrained")
    if result["interval"] is None:  # the demo adapters have no calibration: the page says so
        assert result["interval_status"] == "uncalibrated" and text(drv, "interval") == "not calibrated for this part"
    check_verdict(drv, result)
    check_aspects(drv, result)


def check_aspects(drv, result: dict) -> None:
    """The panel under the holistic score: each of the interview's aspects with its score, CEFR level and spread."""
    assert set(result["aspects"]) == set(ASPECT_NAMES)
    assert drv.find_element("id", "aspects-box").is_displayed()
    rows = drv.find_elements("css selector", "#aspects tbody tr")
    assert [r.get_attribute("data-aspect") for r in rows] == list(result["aspects"])  # in the answer's order
    for row in rows:
        a = result["aspects"][row.get_attribute("data-aspect")]
        cells = [row.find_element("css selector", "th").text] + [
            td.text for td in row.find_elements("css selector", "td")
        ]
        evidence = "validated" if a["validated"] else "not validated"
        want = f"{a['score']:.2f}", a["cefr"], evidence, f"±{a['uncertainty']['score_sd']:.2f}"
        assert cells == [ASPECT_NAMES[row.get_attribute("data-aspect")], *want], cells  # the part's adapter scores it
        assert a["cefr"] in CEFR and a["adapter"] == result["model"]["adapter"]
    # under the holistic score, above the label probabilities
    box, summary, bars = (drv.find_element("css selector", s).rect["y"] for s in ("#aspects-box", ".summary", "#bars"))
    assert summary < box < bars


def check_verdict(drv, result: dict) -> None:
    """The verdict as the service gave it: needed or not, every reason in order, the figures behind them."""
    review = result["review"]
    # Quality-only thresholds; a recording stopped while the voice still speaks is cut off, and says so.
    assert set(review["reasons"]) <= {"low_snr", "clipping", "low_speech_ratio", "cut_off"}, review
    verdict = drv.find_element("id", "verdict")
    assert verdict.get_attribute("class") == ("verdict review" if review["needed"] else "verdict ok")
    title = text(drv, "verdict-title")
    assert title.startswith("Needs review" if review["needed"] else "No review needed"), title
    reasons = drv.find_elements("css selector", "#reasons li")
    assert [li.get_attribute("data-code") for li in reasons] == review["reasons"]
    for li in reasons:
        assert li.text.endswith(f"({li.get_attribute('data-code')})") and len(li.text) > 30, li.text  # plain words
    for dl, fields in (("quality", QUALITY_FIELDS), ("uncertainty", UNCERTAINTY_FIELDS)):
        shown = drv.find_elements("css selector", f"#{dl} dd")
        assert [dd.get_attribute("data-field") for dd in shown] == fields
        assert all(dd.text and dd.text != "–" for dd in shown), [dd.text for dd in shown]
    q = {dd.get_attribute("data-field"): dd.text for dd in drv.find_elements("css selector", "#quality dd")}
    assert q["snr_db"].startswith(f"{result['quality']['snr_db']:.1f} dB"), q
    assert q["speech_s"] == f"{result['quality']['speech_s']:.1f} s", q
    flagged = {dd.get_attribute("data-field") for dd in drv.find_elements("css selector", "#quality dd.flag")}
    figure = {
        "low_snr": "snr_db",
        "clipping": "clipped_fraction",
        "low_speech_ratio": "speech_ratio",
        "cut_off": "ends_in_speech",
    }
    assert flagged == {figure[code] for code in review["reasons"]}


def test_get_root_serves_the_page(base_url):
    r = httpx.get(f"{base_url}/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for element_id in (
        "part",
        "api-key",
        "record",
        "stop",
        "file",
        "submit",
        "score",
        "cefr",
        "bars",
        "chunks",
        "error",
        "status",
        "untrained",
        "verdict",
        "reasons",
        "quality",
        "uncertainty",
        "aspects",
        "playback",
    ):
        assert f'id="{element_id}"' in r.text
    assert "http://" not in r.text.replace("http://127.0.0.1", "") and "https://" not in r.text  # nothing external
    assert "/" not in httpx.get(f"{base_url}/openapi.json", timeout=30).json()["paths"]


def test_record_stop_and_score(driver, base_url):
    open_page(driver, base_url)
    assert driver.find_element("id", "submit").get_attribute("disabled")  # nothing to score yet
    driver.find_element("id", "record").click()
    wait_for(driver, lambda d: d.find_element("id", "stop").is_enabled(), 20, "the recording to start")
    time.sleep(4)
    driver.find_element("id", "stop").click()
    wait_for(driver, lambda d: d.execute_script("return window.lastRecording"), 20, "the recording to stop")
    recording = driver.execute_script("return window.lastRecording")
    assert recording["type"].startswith("audio/webm"), recording  # Chromium's MediaRecorder: WebM/Opus
    assert recording["size"] > 1000 and 3 < recording["seconds"] < 15, recording
    assert "audio/webm" in text(driver, "status")
    result = submit_and_wait(driver)
    upload = driver.execute_script("return window.lastUpload")
    assert upload["source"] == "recording" and upload["type"].startswith("audio/webm"), upload  # sent as recorded
    assert upload["size"] == recording["size"] and upload["name"] == "recording.webm", upload
    assert "audio/webm" in text(driver, "status")
    assert 3 < result["duration_s"] < 15, result
    check_result(driver, base_url, result)


def test_choose_a_file_and_score(driver, base_url, tmp_path):
    answer = write(tmp_path / "answer.wav", 35, 16000, seed=32)
    open_page(driver, base_url)
    driver.find_element("id", "file").send_keys(str(answer))
    wait_for(driver, lambda d: d.find_element("id", "submit").is_enabled(), 20, "the submit button")
    result = submit_and_wait(driver)
    upload = driver.execute_script("return window.lastUpload")
    assert upload == {"type": "audio/wav", "size": answer.stat().st_size, "name": "answer.wav", "source": "file"}
    assert result["duration_s"] == pytest.approx(35, abs=0.1)
    assert len(result["chunks"]) == 2  # longer than 30 s: two chunks on the timeline
    check_result(driver, base_url, result)
    assert result["review"] == {"needed": False, "reasons": []}, result["quality"]  # a clean answer
    assert text(driver, "verdict-title").startswith("No review needed")


def played(drv) -> tuple[str, int]:
    """The player's source and the size of what it plays (read back through the page)."""
    return drv.execute_async_script(
        "const done = arguments[arguments.length - 1], a = document.getElementById('playback');"
        "fetch(a.src).then((r) => r.blob()).then((b) => done([a.src, b.size]), (e) => done([a.src, -1]));"
    )


def test_noisy_file_replaces_the_recording_and_needs_review(driver, base_url, tmp_path):
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(33)
    wave = np.clip(3 * speechlike(8, 16000, seed=33) + 0.2 * rng.normal(size=8 * 16000), -1, 1)  # loud noise, clipped
    noisy = tmp_path / "noisy.wav"
    sf.write(noisy, wave.astype(np.float32), 16000, subtype="PCM_16")
    open_page(driver, base_url)
    driver.find_element("id", "record").click()
    wait_for(driver, lambda d: d.find_element("id", "stop").is_enabled(), 20, "the recording to start")
    time.sleep(1.5)
    driver.find_element("id", "stop").click()
    wait_for(driver, lambda d: d.execute_script("return window.lastRecording"), 20, "the recording to stop")
    recorded_src, recorded_size = played(driver)
    assert recorded_size == driver.execute_script("return window.lastRecording.size")
    driver.find_element("id", "file").send_keys(str(noisy))
    wait_for(driver, lambda d: played(d)[0] != recorded_src, 20, "the player to take the chosen file")
    assert played(driver)[1] == noisy.stat().st_size  # the player plays the chosen file, not the recording
    assert driver.find_element("id", "playback").is_displayed()
    result = submit_and_wait(driver)
    assert driver.execute_script("return window.lastUpload")["source"] == "file"
    check_result(driver, base_url, result)
    assert result["review"]["needed"] and {"low_snr", "clipping"} <= set(result["review"]["reasons"]), result
    # the same answer straight through the API: the page shows exactly its verdict
    with noisy.open("rb") as f:
        api = httpx.post(
            f"{base_url}/v1/score",
            headers=USER,
            data={"part": PAGE_PART},
            files={"audio": ("noisy.wav", f, "audio/wav")},
            timeout=SCORE_WAIT_S,
        )
    assert api.status_code == 200, api.text
    shown = [li.get_attribute("data-code") for li in driver.find_elements("css selector", "#reasons li")]
    assert shown == api.json()["review"]["reasons"] == result["review"]["reasons"]
    assert "background noise" in text(driver, "reasons") and "clipped" in text(driver, "reasons")
    assert text(driver, "verdict-title").startswith("Needs review")
    if os.environ.get("L2GRADER_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1000, max(900, height + 160))  # the whole page, no scrollbar
        try:
            assert driver.save_screenshot(str(REPO / "docs" / "page.png"))
        finally:
            driver.set_window_size(1000, 1350)
    # the aspects' review reasons in plain words, the aspect they point at in red; fields the page does not know
    # yet still show: an unknown reason code verbatim, a score range, an aspect of the part's own
    aspects = {name: dict(a) for name, a in result["aspects"].items()}
    aspects["fluency"] = dict(aspects["fluency"], uncertainty=dict(aspects["fluency"]["uncertainty"], score_sd=2.45))
    aspects["coherence"] = dict(aspects["coherence"], label_mass=1e-12)
    aspects["task_fulfilment"] = dict(aspects["coherence"], label_mass=0.9, adapter="interview.task_fulfilment@abc")
    aspect_reasons = ["aspect_uncertain", "aspect_low_label_mass", "aspects_disagree"]
    later = dict(
        result,
        review={"needed": True, "reasons": [*result["review"]["reasons"], *aspect_reasons, "some_new_reason"]},
        interval={"low": 2.1, "high": 3.4, "coverage": 0.8},
        aspects=aspects,
    )
    driver.execute_script(
        "const body = JSON.stringify(arguments[0]);"
        "window.fetch = async () => new Response(body, {headers: {'content-type': 'application/json'}});",
        later,
    )
    driver.find_element("id", "submit").click()
    wait_for(driver, lambda d: "some_new_reason" in text(d, "reasons"), 20, "the answer with new fields")
    assert [li.text for li in driver.find_elements("css selector", "#reasons li")][-1] == "some_new_reason"
    assert text(driver, "interval") == "2.10–3.40" and text(driver, "interval-name") == "Likely range (80%)"
    items = {li.get_attribute("data-code"): li.text for li in driver.find_elements("css selector", "#reasons li")}
    assert (
        "unsure of an aspect's score" in items["aspect_uncertain"]
        and "Fluency: spread ±2.45" in (items["aspect_uncertain"])
    )
    assert "Coherence: label mass 1e-12" in items["aspect_low_label_mass"]
    mean = sum(a["score"] for a in aspects.values()) / len(aspects)
    assert f"their mean {mean:.2f}, the overall score {result['score']:.2f}" in items["aspects_disagree"]
    flagged = [r.get_attribute("data-aspect") for r in driver.find_elements("css selector", "#aspects tr.flag")]
    assert set(flagged) == {"fluency", "coherence"}
    assert driver.find_element("css selector", '#aspects tr[data-aspect="fluency"] td:last-child').text.endswith(
        "(review)"
    )
    own = driver.find_element("css selector", '#aspects tr[data-aspect="task_fulfilment"] th').text
    assert own == "task fulfilment (own adapter)"


def add_answer(drv, part: str, path: Path) -> None:
    """Choose a file for a part in the page's candidate section and add it to the candidate's answers."""
    from selenium.webdriver.support.ui import Select

    Select(drv.find_element("id", "cand-part")).select_by_value(part)
    drv.find_element("id", "cand-file").send_keys(str(path))
    wait_for(drv, lambda d: d.find_element("id", "cand-add").is_enabled(), 20, "the add-answer button")
    before = len(drv.find_elements("css selector", "#cand-answers li"))
    drv.find_element("id", "cand-add").click()
    wait_for(drv, lambda d: len(d.find_elements("css selector", "#cand-answers li")) == before + 1, 20, "the answer")


def score_candidate(drv, answers: int) -> dict:
    """Click "Score the candidate", wait (bounded) for the batch's result, return it as the page holds it."""
    drv.find_element("id", "cand-submit").click()
    wait_for(
        drv,
        lambda d: (
            d.execute_script("return window.lastBatch && window.lastBatch.results.length")
            or d.find_element("id", "cand-error").is_displayed()
        ),
        SCORE_WAIT_S,
        "the candidate's result",
    )
    assert not drv.find_element("id", "cand-error").is_displayed(), text(drv, "cand-error")
    batch = drv.execute_script("return window.lastBatch")
    assert len(batch["results"]) == answers and drv.find_element("id", "cand-result").is_displayed()
    return batch


def check_candidate(drv, batch: dict) -> None:
    """The overall as the service gave it: score, level, withheld and why, the rule, the counts, the review, and
    each answer's own result in order."""
    o = batch["overall"]
    assert text(drv, "cand-score") == ("withheld" if o["score"] is None else f"{o['score']:.2f}")
    assert text(drv, "cand-cefr") == ("withheld" if o["cefr"] is None else o["cefr"])
    assert drv.find_element("id", "cand-verdict").get_attribute("class") == (
        "verdict review" if o["withheld"] else "verdict ok"
    )
    assert text(drv, "cand-verdict-title").startswith("Withheld" if o["withheld"] else "Overall score given")
    withheld = drv.find_elements("css selector", "#cand-withheld li")
    assert [li.get_attribute("data-kind") for li in withheld] == [w["kind"] for w in o["withheld_reasons"]]
    assert all(li.text.startswith(w["message"]) for li, w in zip(withheld, o["withheld_reasons"], strict=True))
    assert o["rule"] and text(drv, "cand-rule") == f"Rule: {o['rule']}"
    counts = {dd.get_attribute("data-field"): dd.text for dd in drv.find_elements("css selector", "#cand-counts dd")}
    assert counts == {
        "scored": str(o["scored"]),
        "not_scorable": str(o["not_scorable"]),
        "failed": str(o["failed"]),
        "complete": "yes" if o["complete"] else "no",
    }
    assert drv.find_element("id", "cand-interval-box").is_displayed() and text(drv, "cand-interval")
    reasons = drv.find_elements("css selector", "#cand-reasons li")
    assert [li.get_attribute("data-code") for li in reasons] == o["review"]["reasons"]
    for li in reasons:
        code = li.get_attribute("data-code")
        assert li.text == code or (li.text.endswith(f"({code})") and len(li.text) > 30), li.text
    items = drv.find_elements("css selector", "#cand-results li")
    assert [(li.get_attribute("data-part"), li.get_attribute("data-status")) for li in items] == [
        (r["part"], r["status"]) for r in batch["results"]
    ]
    for li, r in zip(items, batch["results"], strict=True):
        if r["status"] == "scored":
            assert f"score {r['score']:.2f}, {r['cefr']}" in li.text, li.text


def test_candidate_answers_scored_together(driver, base_url, tmp_path):
    import numpy as np
    import soundfile as sf

    files = {
        "interview": write(tmp_path / "interview.wav", 12, 16000, seed=34),
        "long_turn": write(tmp_path / "long_turn.wav", 20, 16000, seed=35),
    }
    open_page(driver, base_url)
    assert driver.find_element("id", "cand-submit").get_attribute("disabled")  # no answers yet
    for part, path in files.items():
        add_answer(driver, part, path)
    batch = score_candidate(driver, 2)
    assert [r["status"] for r in batch["results"]] == ["scored", "scored"], batch["results"]
    o = batch["overall"]
    assert not o["withheld"] and o["cefr"] in CEFR and set(o["by_part"]) == set(files)
    check_candidate(driver, batch)
    # the same batch straight through the API: the page shows its overall
    answers = [
        {"part": part, "audio_base64": base64.b64encode(path.read_bytes()).decode(), "response_id": f"answer-{i}"}
        for i, (part, path) in enumerate(files.items(), 1)
    ]
    api = httpx.post(f"{base_url}/v1/score/batch", headers=USER, json={"answers": answers}, timeout=SCORE_WAIT_S)
    assert api.status_code == 200, api.text
    want = api.json()["overall"]
    assert float(text(driver, "cand-score")) == pytest.approx(want["score"], abs=0.006)
    assert (text(driver, "cand-cefr"), o["withheld"], o["rule"]) == (want["cefr"], want["withheld"], want["rule"])
    assert [r["response_id"] for r in batch["results"]] == ["answer-1", "answer-2"]
    # a silent third answer: the default rule withholds the result, and the page says why
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000 * 5, dtype=np.float32), 16000)
    add_answer(driver, "interview", silent)
    batch = score_candidate(driver, 3)
    o = batch["overall"]
    assert batch["results"][2]["status"] == "not_scorable" and o["withheld"] and o["score"] is None, o
    assert "not_scorable" in o["review"]["reasons"] and o["withheld_reasons"], o
    check_candidate(driver, batch)
    assert "could not be scored" in text(driver, "cand-reasons")
    assert text(driver, "cand-score") == "withheld"
