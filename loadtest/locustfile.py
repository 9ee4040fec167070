"""Locust load test of the scoring service, shaped like an exam platform's traffic.

Each simulated user is one of the platform's upload workers: it takes a
candidate's answer to some exam part, posts it (multipart, as a platform
uploads a recording) and waits a moment before the next one. Answers come
from a pool generated once at start-up and reused:

- ``short``: 10-20 s (interview questions), most of the traffic;
- ``medium``: 30-60 s (long turns, two chunks);
- ``long``: 3-5 min (presentations, up to ten chunks), a few.

Run it through ``l2grader loadtest`` (which starts the service, runs Locust
headless and summarises), or by hand::

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -t 60s

Settings (environment):

``L2GRADER_API_KEY``       bearer key sent with every request (none by default)
``L2GRADER_PARTS``         comma-separated parts, each with an optional weight (``a:40,b:20,c``; default 1);
                           default: every part of ``GET /v1/parts``, equally
``L2GRADER_MIX``           length mix, e.g. ``short:80,medium:17,long:3`` (the default)
``L2GRADER_FORMATS``       comma-separated upload formats, rotated: wav, flac, ogg, mp3 (default wav)
``L2GRADER_POOL``          answers generated per length class (default 8)
``L2GRADER_UNIQUE``        1 (default): every WAV upload differs from all others in one inaudible sample,
                           so the engine's caches (audio features, prefix blocks) see fresh answers
                           as in production; 0: send the pool's files byte for byte
``L2GRADER_WAIT_S``        think time, uniform in [0, WAIT_S] (default 0.5)
``L2GRADER_SHAPE``         ``step``: step ramp up to ``L2GRADER_USERS`` users over ``L2GRADER_DURATION_S``
``L2GRADER_STEPS``         number of steps of the step ramp (default 5)
``L2GRADER_STATS``         where to write this run's exact per-answer record (JSON) at the end
``L2GRADER_RETRIES``       times an answer refused with 503/429 (or a broken connection) is sent again, after
                           Retry-After with backoff and the same response_id (default 3; 0: never)

SIGUSR1 ends the run early as its time limit would: no new answers, those in flight finish (within
``--stop-timeout``), the record is written.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid

from locust import LoadTestShape, between, events, task
from locust.contrib.fasthttp import FastHttpUser

from loadtest.audio import answer_bytes
from loadtest.mix import DEFAULT_MIX, LENGTHS, parse_mix, parse_parts
from loadtest.multipart import MultipartAnswer, multipart_answer
from loadtest.retry import RETRYABLE, retry_delay

RATES = {"wav": 16000, "flac": 16000, "ogg": 48000, "mp3": 22050}
CONTENT_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg", "mp3": "audio/mpeg"}


class AnswerPool:
    """Answers generated once per Locust process, with their multipart bodies built per part on first use."""

    def __init__(self, mix: dict[str, float], per_class: int, formats: list[str], seed: int = 1234):
        rng = random.Random(seed)
        self.mix = mix
        self.answers: dict[str, list[tuple[str, float, bytes]]] = {}
        n = 0
        for cls in mix:
            lo, hi = LENGTHS[cls]
            items = []
            for _ in range(per_class):
                fmt = formats[n % len(formats)]
                seconds = round(rng.uniform(lo, hi), 2)
                items.append((fmt, seconds, answer_bytes(seconds, seed + n, fmt, RATES[fmt])))
                n += 1
            self.answers[cls] = items
        self._bodies: dict[tuple[str, str, int], MultipartAnswer] = {}
        self._lock = threading.Lock()

    def pick(self, rng: random.Random) -> tuple[str, int]:
        cls = rng.choices(list(self.mix), weights=list(self.mix.values()))[0]
        return cls, rng.randrange(len(self.answers[cls]))

    def body(
        self, part: str, cls: str, i: int, rng: random.Random | None = None, response_id: str | None = None
    ) -> tuple[bytes, str, float]:
        """Multipart body (with ``response_id`` when given), its content type and the answer's length in seconds.

        With ``rng``, a WAV answer gets one 16-bit sample set to a random quiet value
        (at most -54 dBFS): a new file for every request, the same answer to a listener.
        """
        fmt, seconds, audio = self.answers[cls][i]
        key = (part, cls, i)
        with self._lock:
            if key not in self._bodies:
                self._bodies[key] = multipart_answer(part, audio, f"{cls}-{i}.{fmt}", CONTENT_TYPES[fmt])
            form = self._bodies[key]
        body, ctype = form.body, form.content_type
        if rng is not None and fmt == "wav":
            start = form.audio_offset + 44  # after the 44-byte WAV header
            pos = start + 2 * rng.randrange((len(audio) - 44) // 2)
            body = bytearray(body)
            body[pos : pos + 2] = rng.randrange(-64, 65).to_bytes(2, "little", signed=True)
            body = bytes(body)
        if response_id is not None:
            body = form.with_response_id(response_id, body)
        return body, ctype, seconds


class Record:
    """Exact per-answer record of this process (Locust's own percentiles are rounded)."""

    def __init__(self):
        self.latencies_ms: list[float] = []
        self.audio_s = 0.0
        self.chunks = 0
        self.statuses: dict[str, int] = {}
        self.parts: dict[str, dict] = {}  # part -> its latencies (answers) and statuses (attempts)
        self.retries = 0  # attempts sent again after a retryable refusal
        self.given_up = 0  # answers still refused after every retry
        self.refusal_kinds: dict[str, int] = {}  # 503/429 refusals by their JSON error kind ("?" if none)
        self.refusals_without_retry_after = 0
        self.first_start: float | None = None
        self.last_end: float | None = None

    def add(
        self, status: int, started: float, ended: float, latency_ms: float, audio_s: float, chunks: int, part: str = ""
    ) -> None:
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
        by_part = self.parts.setdefault(part, {"latencies_ms": [], "statuses": {}})
        by_part["statuses"][str(status)] = by_part["statuses"].get(str(status), 0) + 1
        self.first_start = started if self.first_start is None else min(self.first_start, started)
        self.last_end = ended if self.last_end is None else max(self.last_end, ended)
        if status == 200:
            self.latencies_ms.append(latency_ms)
            by_part["latencies_ms"].append(latency_ms)
            self.audio_s += audio_s
            self.chunks += chunks

    def refused(self, response) -> None:
        """A retryable refusal: its error kind (the API's JSON body) and whether it said when to retry."""
        try:
            kind = str(response.json()["error"]["kind"])
        except (ValueError, KeyError, TypeError):
            kind = "?"
        self.refusal_kinds[kind] = self.refusal_kinds.get(kind, 0) + 1
        if not response.headers.get("Retry-After"):
            self.refusals_without_retry_after += 1

    def dump(self) -> dict:
        return {
            "latencies_ms": self.latencies_ms,
            "audio_s": self.audio_s,
            "chunks": self.chunks,
            "statuses": self.statuses,
            "by_part": self.parts,
            "retries": self.retries,
            "given_up": self.given_up,
            "refusal_kinds": self.refusal_kinds,
            "refusals_without_retry_after": self.refusals_without_retry_after,
            "first_start": self.first_start,
            "last_end": self.last_end,
        }


UNIQUE = os.environ.get("L2GRADER_UNIQUE", "1") != "0"
RETRIES = int(os.environ.get("L2GRADER_RETRIES", "3"))
POOL: AnswerPool | None = None
PARTS: list[str] = []
PART_WEIGHTS: list[float] = []
RECORD = Record()


def _auth() -> dict[str, str]:
    key = os.environ.get("L2GRADER_API_KEY", "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def _fetch_parts(host: str) -> list[str]:
    import urllib.request

    req = urllib.request.Request(f"{host.rstrip('/')}/v1/parts", headers=_auth())  # noqa: S310 - loopback http URLs built here
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback http URLs built here
        return sorted(p["part"] for p in json.load(r)["parts"])


@events.init.add_listener
def _end_early_on_sigusr1(environment, **_):
    import gevent

    def end():
        if environment.runner is not None:
            environment.runner.quit()  # what the time limit does: users finish their answer, then the summary

    gevent.signal_handler(signal.SIGUSR1, end)


@events.test_start.add_listener
def _prepare(environment, **_):
    global POOL, PARTS, PART_WEIGHTS
    if POOL is None:
        formats = [f.strip() for f in os.environ.get("L2GRADER_FORMATS", "wav").split(",") if f.strip()]
        unknown = [f for f in formats if f not in RATES]
        if unknown:
            raise ValueError(f"unknown upload format(s) {unknown} (known: {', '.join(RATES)})")
        POOL = AnswerPool(
            parse_mix(os.environ.get("L2GRADER_MIX", DEFAULT_MIX)), int(os.environ.get("L2GRADER_POOL", "8")), formats
        )
    if not PARTS:
        given = parse_parts(os.environ.get("L2GRADER_PARTS", ""))
        PARTS = list(given) or _fetch_parts(environment.host)
        if not PARTS:
            raise RuntimeError("the service lists no parts to score")
        PART_WEIGHTS = [given.get(p, 1.0) for p in PARTS]


@events.quitting.add_listener
def _write_record(environment, **_):
    path = os.environ.get("L2GRADER_STATS")
    if path:
        with open(path, "w") as f:
            json.dump({**RECORD.dump(), "parts": PARTS}, f)


class ExamPlatform(FastHttpUser):
    """One upload worker of an exam platform."""

    wait_time = between(0.0, float(os.environ.get("L2GRADER_WAIT_S", "0.5")))
    connection_timeout = 60.0
    network_timeout = 600.0

    def on_start(self):
        self.rng = random.Random()
        self.auth = _auth()

    @task
    def score_answer(self):
        """Upload one answer; a 503/429 or a broken connection is sent again (same response_id) up to RETRIES times."""
        part = self.rng.choices(PARTS, weights=PART_WEIGHTS)[0]
        cls, i = POOL.pick(self.rng)
        body, ctype, seconds = POOL.body(part, cls, i, self.rng if UNIQUE else None, response_id=uuid.uuid4().hex)
        for attempt in range(RETRIES + 1):
            status, retry_after = self._post(part, body, ctype, seconds)
            if status not in RETRYABLE and status != 0:
                return
            if attempt == RETRIES:
                RECORD.given_up += 1
                return
            RECORD.retries += 1
            time.sleep(retry_delay(attempt, retry_after, rng=self.rng))

    def _post(self, part: str, body: bytes, ctype: str, seconds: float) -> tuple[int, str | None]:
        started = time.time()
        t0 = time.perf_counter()
        with self.client.post(
            "/v1/score",
            data=body,
            headers={**self.auth, "Content-Type": ctype},
            name=f"/v1/score [{part}]",
            catch_response=True,
        ) as r:
            latency_ms = (time.perf_counter() - t0) * 1000
            status = r.status_code or 0
            chunks, audio_s = 0, 0.0
            if status == 200:
                try:
                    got = r.json()
                    chunks, audio_s = len(got["chunks"]), float(got["duration_s"])
                    r.success()
                except (ValueError, KeyError, TypeError) as e:
                    status = -1
                    r.failure(f"unreadable score: {e}")
            elif status in RETRYABLE:
                r.failure(f"{status} retryable (Retry-After {r.headers.get('Retry-After')})")
                RECORD.refused(r)
            else:
                r.failure(f"{status}: {(r.text or '')[:200]}")
            RECORD.add(status, started, time.time(), latency_ms, audio_s, chunks, part)
            return status, r.headers.get("Retry-After") if status else None


if os.environ.get("L2GRADER_SHAPE", "constant") == "step":

    class StepRamp(LoadTestShape):
        """Step ramp to saturation: ``L2GRADER_STEPS`` equal steps up to ``L2GRADER_USERS`` users."""

        users = int(os.environ.get("L2GRADER_USERS", "32"))
        duration = float(os.environ.get("L2GRADER_DURATION_S", "120"))
        steps = max(1, int(os.environ.get("L2GRADER_STEPS", "5")))

        def tick(self):
            t = self.get_run_time()
            if t >= self.duration:
                return None
            step = min(self.steps, int(t // (self.duration / self.steps)) + 1)
            users = max(1, round(self.users * step / self.steps))
            return users, users  # spawn each step at once
