"""``l2grader soak``: the service under mixed normal and hostile traffic for a while, its memory watched.

For ``--duration`` seconds, against a service it starts (tiny checkpoint,
API keys, a short body deadline), at once:

- ``--users`` clients score answers of 5-20 s (multipart), retrying 503/429
  with the same ``response_id`` as the project's clients do;
- one client sends bad inputs in turn: corrupt and silent audio, an
  oversized body, malformed JSON, invented part ids, keyless admin calls;
- ``--slow`` connections send their body one byte a second and are cut off
  by the body deadline, then open again;
- every ``--swap-every`` seconds an admin replaces a part's adapter (two
  adapters in turn).

With ``--attacks``, after the warm-up one more client runs the door's
attacks in turn (:mod:`loadtest.attacks`: a 300 MB header, 20,000 headers,
600 slowloris and 600 idle connections, 230 requests each with a new
``X-Forwarded-For``, six keyless 170 MB bodies, bytes that are not HTTP, an
adapter rewritten in place, a ``DELETE`` under load); each attack's statuses
are reported, and any 5xx but a 503 fails the soak.

Every process of the service is sampled for RSS every 10 s, and every 2 s for
RSS and open file descriptors. The result: 5xx answers (must be none),
answers sent and answered (every accepted answer must be answered), the first
RSS after ``--warmup`` seconds and the last, per process, and per process
the memory and descriptors at the start, their peak, at the end of the
traffic and after ``--quiet`` seconds without traffic. The last stdout line
is one JSON object; the exit code is 1 on any 5xx, a lost answer or an RSS
growth over ``--max-growth`` (default 25 %).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from loadtest.audio import answer_bytes
from loadtest.retry import RETRYABLE, retry_delay
from serve.runtime.console import log


class Tally:
    """What the clients saw, thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()
        self.sent = self.answered = self.lost = self.retries = 0
        self.server_errors: list[str] = []

    def status(self, code: int, text: str = "") -> None:
        with self.lock:
            self.statuses[str(code)] += 1
            if code >= 500 and code != 503:
                self.server_errors.append(f"{code} {text[:200]}")
            if code == 503 and '"error"' not in text:
                self.server_errors.append(f"503 without the JSON body: {text[:200]}")


def _post(client, url: str, headers: dict, **kw):
    import httpx

    try:
        return client.post(url, headers=headers, **kw)
    except httpx.HTTPError:
        return None


def normal_user(url: str, headers: dict, stop: threading.Event, tally: Tally, parts: list[str], seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    answers = [answer_bytes(rng.uniform(5, 20), seed * 100 + i) for i in range(4)]
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            rid = uuid.uuid4().hex
            form = {"part": rng.choice(parts), "response_id": rid}
            with tally.lock:
                tally.sent += 1
            for attempt in range(6):
                r = _post(
                    client, f"{url}/v1/score", headers, data=form, files={"audio": ("a.wav", rng.choice(answers))}
                )
                code = 0 if r is None else r.status_code
                tally.status(code, "" if r is None else r.text)
                if code == 200 and r.json().get("response_id") == rid:
                    with tally.lock:
                        tally.answered += 1
                    break
                if code not in RETRYABLE and code != 0:
                    break
                with tally.lock:
                    tally.retries += 1
                time.sleep(retry_delay(attempt, None if r is None else r.headers.get("Retry-After"), rng=rng))
            else:
                with tally.lock:
                    tally.lost += 1


def bad_user(url: str, headers: dict, stop: threading.Event, tally: Tally) -> None:
    import httpx

    rng = random.Random(7)
    silent = answer_bytes(3.0, 1)[:44] + b"\0" * 96000
    cases = [
        lambda c: c.post(
            f"{url}/v1/score",
            headers=headers,
            data={"part": "interview"},
            files={"audio": ("x.wav", b"RIFF" + rng.randbytes(5000))},
        ),
        lambda c: c.post(
            f"{url}/v1/score", headers=headers, data={"part": "interview"}, files={"audio": ("s.wav", silent)}
        ),
        lambda c: c.post(
            f"{url}/v1/score", headers={**headers, "Content-Type": "application/json"}, content=b"{" * 5000
        ),
        lambda c: c.post(
            f"{url}/v1/score",
            headers=headers,
            data={"part": rng.randbytes(20).hex()},
            files={"audio": ("a.wav", silent)},
        ),
        lambda c: c.put(f"{url}/v1/parts/{rng.randbytes(1000).hex()}", json={}),
        lambda c: c.delete(f"{url}/v1/parts/{rng.randbytes(30).hex()}"),
        lambda c: c.post(
            f"{url}/v1/score",
            headers=headers,
            data={"part": "interview", "response_id": "r" * 5000},
            files={"audio": ("a.wav", silent)},
        ),
        lambda c: c.post(
            f"{url}/v1/score",
            headers={**headers, "Content-Type": "multipart/form-data"},
            content=rng.randbytes(3_000_000),
        ),
    ]
    port = int(url.rsplit(":", 1)[1])
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            if rng.random() < 0.1:
                tally.status(*_declared_too_large(port, headers))
                continue
            try:
                r = rng.choice(cases)(client)
                tally.status(r.status_code, r.text)
            except Exception as e:  # noqa: BLE001 - a refused connection or a protocol error on our side: not the service's answer
                tally.status(0, type(e).__name__)
            time.sleep(0.05)


def _declared_too_large(port: int, headers: dict) -> tuple[int, str]:
    """A body that declares 900 MB and sends 1 KB: refused before it is read."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(
                b"POST /v1/score HTTP/1.1\r\nHost: s\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                + _auth_line(headers)
                + f"Content-Length: {900 * 1024 * 1024}\r\n\r\n".encode()
                + b"x" * 1024
            )
            head = s.recv(4096).decode(errors="replace")
        return (int(head[9:12]), head) if head.startswith("HTTP/1.1 ") else (0, head)
    except OSError as e:
        return 0, type(e).__name__


def _auth_line(headers: dict) -> bytes:
    return f"Authorization: {headers['Authorization']}\r\n".encode()


def slow_user(port: int, headers: dict, stop: threading.Event, tally: Tally) -> None:
    """A keyed client that sends its body a byte a second (a keyless one is refused before its body)."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(
                    b"POST /v1/score HTTP/1.1\r\nHost: s\r\nContent-Length: 100000\r\n"
                    + _auth_line(headers)
                    + b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
                )
                s.settimeout(1.0)
                while not stop.is_set():
                    try:
                        head = s.recv(200)
                        if head.startswith(b"HTTP/1.1 "):
                            tally.status(int(head[9:12]), head.decode(errors="replace"))
                        stop.wait(1.0)  # then a new connection (not at once: a refused one is answered at once)
                        break
                    except TimeoutError:
                        s.sendall(b"x")
        except OSError:
            time.sleep(1)


def swapper(url: str, admin: dict, stop: threading.Event, tally: Tally, adapters: list[str], every_s: float) -> None:
    import httpx

    i = 0
    while not stop.wait(every_s):
        i += 1
        r = httpx.put(
            f"{url}/v1/parts/interview", headers=admin, json={"adapter": adapters[i % len(adapters)]}, timeout=120
        )
        tally.status(r.status_code, r.text)
        log(f"adapter swap {i}: {r.status_code}")


def rss_by_process(pids: list[int]) -> dict[str, int]:
    """RSS in MB of each process, named by its command (numbered when several share one)."""
    import psutil

    out: dict[str, int] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            name = " ".join(p.cmdline())[:48] or p.name()
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        key, n = name, 2
        while key in out:
            key, n = f"{name} #{n}", n + 1
        out[key] = rss // (1024 * 1024)
    return out


#: Roles of the service's processes, by a word of their command line.
ROLES = (("ProxyActor", "proxy"), ("Ingress", "ingress"), ("Scorer", "scorer"), ("EngineCore", "engine core"))


def usage_by_role(pids: list[int]) -> dict[str, dict[str, int]]:
    """RSS (MB) and open file descriptors of the proxy, ingress, scorer and engine processes (numbered when several)."""
    import psutil

    out: dict[str, dict[str, int]] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            cmd = " ".join(p.cmdline()) or p.name()
            role = next((r for word, r in ROLES if word in cmd), None)
            if role is None:
                continue
            usage = {"rss_mb": p.memory_info().rss // (1024 * 1024), "fds": p.num_fds()}
        except psutil.Error:
            continue
        key, n = role, 2
        while key in out:
            key, n = f"{role} #{n}", n + 1
        out[key] = usage
    return out


class UsageWatch:
    """Samples :func:`usage_by_role` every ``every_s`` in a thread; keeps the first sample and the peak per process."""

    def __init__(self, pids, every_s: float = 2.0):
        self.pids, self.every_s = pids, every_s
        self.start = usage_by_role(pids())
        self.peak = {k: dict(v) for k, v in self.start.items()}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(self.every_s):
            for k, v in usage_by_role(self.pids()).items():
                peak = self.peak.setdefault(k, dict(v))
                for m, x in v.items():
                    peak[m] = max(peak[m], x)

    def now(self) -> dict[str, dict[str, int]]:
        return usage_by_role(self.pids())

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)


def attacker(url, user, admin, adapter, folder, stop, tally, results: dict, warmup_s: float) -> None:
    """Runs the door's attacks in turn once the warm-up is over (see :mod:`loadtest.attacks`)."""
    from loadtest.attacks import door_attacks

    if stop.wait(warmup_s):
        return
    for name, attack in door_attacks(url, user, admin, adapter, folder):
        if stop.is_set():
            return
        t0 = time.time()
        try:
            result = attack()
        except Exception as e:  # noqa: BLE001 - the attack's own failure is reported, not raised
            result = {"statuses": {}, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        result["seconds"] = round(time.time() - t0, 1)
        results[name] = result
        for code in result["statuses"]:
            if str(code).isdigit() and int(code) >= 500 and int(code) != 503:
                with tally.lock:
                    tally.server_errors.append(f"{code} from attack {name}")
        log(f"attack {name}: {json.dumps(result)}")


def run_soak(args: argparse.Namespace) -> dict:
    import yaml

    from loadtest.service import Service, ensure_tiny_model, get_json
    from serve.service.settings import load_service_config

    cfg = load_service_config(args.config)
    ensure_tiny_model(cfg)
    out = Path(args.out or f"runs/soak-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(Path(args.config).read_text())
    raw["model"]["base"] = cfg.model.base
    for name, part in cfg.parts.items():  # the copy lies elsewhere: every adapter path absolute
        raw["parts"][name]["adapter"] = None if part.adapter is None else str(part.adapter)
        for aspect, settings in part.aspects.items():
            if settings.adapter is not None:
                raw["parts"][name]["aspects"][aspect]["adapter"] = str(settings.adapter)
    raw.setdefault("serving", {}).update(
        {
            "api_keys_env": "L2GRADER_SOAK_KEYS",
            "admin_keys_env": "L2GRADER_SOAK_ADMIN",
            "body_timeout_s": args.body_timeout,
            "registry_file": str(out / "registry.json"),
            # The attacks copy adapters here to swap them in place.
            "adapter_roots": sorted({str(p.adapter.parent) for p in cfg.parts.values() if p.adapter is not None})
            + [str(out / "adapters")],
        }
    )
    (out / "adapters").mkdir(exist_ok=True)
    config = out / "soak.yaml"
    config.write_text(yaml.safe_dump(raw))
    user_key, admin_key = uuid.uuid4().hex, uuid.uuid4().hex
    headers, admin = {"Authorization": f"Bearer {user_key}"}, {"Authorization": f"Bearer {admin_key}"}
    adapters = [str(p.adapter) for p in cfg.parts.values() if p.adapter is not None]
    log(f"starting the service (log {out / 'serve.log'})")
    service = Service(
        str(config), out / "serve.log", env={"L2GRADER_SOAK_KEYS": user_key, "L2GRADER_SOAK_ADMIN": admin_key}
    )
    tally, stop = Tally(), threading.Event()
    samples: list[tuple[float, dict[str, int]]] = []
    attack_results: dict[str, dict] = {}
    watch = UsageWatch(service.pids)
    try:
        parts = sorted(p["part"] for p in get_json(f"{service.url}/v1/parts", headers)[1]["parts"])
        threads = [
            threading.Thread(target=normal_user, args=(service.url, headers, stop, tally, parts, i))
            for i in range(args.users)
        ]
        threads.append(threading.Thread(target=bad_user, args=(service.url, headers, stop, tally)))
        threads += [
            threading.Thread(target=slow_user, args=(service.port, headers, stop, tally)) for _ in range(args.slow)
        ]
        if args.attacks:
            source = Path(adapters[0]) if adapters else None
            threads.append(
                threading.Thread(
                    target=attacker,
                    args=(service.url, headers, admin, source, out / "adapters", stop, tally, attack_results),
                    kwargs={"warmup_s": min(args.warmup, args.duration / 4)},
                )
            )
        if len(adapters) > 1:
            threads.append(
                threading.Thread(target=swapper, args=(service.url, admin, stop, tally, adapters, args.swap_every))
            )
        for t in threads:
            t.start()
        t0 = time.time()
        while time.time() - t0 < args.duration:
            time.sleep(10)
            samples.append((time.time() - t0, rss_by_process(service.pids())))
            log(
                f"{time.time() - t0:5.0f} s: answered {tally.answered}/{tally.sent}, statuses {dict(tally.statuses)}, "
                f"RSS {sum(samples[-1][1].values())} MB"
            )
        stop.set()
        for t in threads:
            t.join(timeout=180)
        end_of_traffic = watch.now()
        log(f"traffic over; {args.quiet:g} s without any")
        time.sleep(args.quiet)
        after_quiet = watch.now()
    finally:
        watch.stop()
        service.stop()
        shutil.rmtree(out / "adapters", ignore_errors=True)
    after = [s for s in samples if s[0] >= args.warmup] or samples
    first, last = after[0][1], after[-1][1]
    growth = {k: round((last[k] - first[k]) / first[k], 3) for k in first if k in last and first[k] >= 50}
    return {
        "duration_s": args.duration,
        "users": args.users,
        "slow_connections": args.slow,
        "statuses": dict(tally.statuses),
        "answers_sent": tally.sent,
        "answers_answered": tally.answered,
        "answers_lost": tally.lost,
        "retries": tally.retries,
        "server_errors": tally.server_errors[:20],
        "rss_mb_first": first,
        "rss_mb_last": last,
        "rss_growth": growth,
        "rss_total_mb_first": sum(first.values()),
        "rss_total_mb_last": sum(last.values()),
        "attacks": attack_results,
        "usage": {
            name: {
                "start": watch.start.get(name),
                "peak": watch.peak.get(name),
                "end_of_traffic": end_of_traffic.get(name),
                "after_quiet": after_quiet.get(name),
            }
            for name in sorted(set(watch.peak) | set(after_quiet))
        },
    }


def cmd_soak(args: argparse.Namespace) -> int:
    result = run_soak(args)
    for name in result["rss_mb_first"]:
        print(f"{result['rss_mb_first'][name]:6d} MB -> {result['rss_mb_last'].get(name, 0):6d} MB  {name}")
    print("process        RSS MB start / peak / end / after quiet     fds start / peak / end / after quiet")
    for name, u in result["usage"].items():
        cols = [u[k] or {"rss_mb": 0, "fds": 0} for k in ("start", "peak", "end_of_traffic", "after_quiet")]
        rss = " / ".join(f"{c['rss_mb']:5d}" for c in cols)
        fds = " / ".join(f"{c['fds']:5d}" for c in cols)
        print(f"{name:12s} {rss}      {fds}")
    for name, a in result["attacks"].items():
        print(f"attack {name}: {json.dumps(a)}")
    print(
        f"answers sent {result['answers_sent']}, answered {result['answers_answered']}, lost {result['answers_lost']}, "
        f"retries {result['retries']}; statuses {result['statuses']}"
    )
    print(json.dumps(result))
    # in flight at the stop: the last answer of each user may be unanswered when the clients stop
    lost = result["answers_sent"] - result["answers_answered"] - args.users
    grew = [k for k, g in result["rss_growth"].items() if g > args.max_growth]
    return 1 if result["server_errors"] or result["answers_lost"] or lost > 0 or grew else 0


def add_soak_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soak", help="the service under mixed normal and hostile traffic, memory per process watched")
    p.add_argument("--config", default="configs/demo.yaml", help="grader YAML config (default configs/demo.yaml)")
    p.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    p.add_argument("--warmup", type=float, default=120, help="seconds before the first RSS kept (default 120)")
    p.add_argument("--users", type=int, default=8, help="clients scoring answers (default 8)")
    p.add_argument("--slow", type=int, default=20, help="slow-body connections held (default 20)")
    p.add_argument("--swap-every", type=float, default=60, help="seconds between adapter swaps (default 60)")
    p.add_argument("--body-timeout", type=float, default=10, help="the service's body deadline (default 10 s)")
    p.add_argument("--max-growth", type=float, default=0.25, help="RSS growth that fails the soak (default 0.25)")
    p.add_argument(
        "--attacks", action="store_true", help="also run the door's attacks in turn after the warm-up (see above)"
    )
    p.add_argument(
        "--quiet", type=float, default=60, help="seconds without traffic before the last sample (default 60)"
    )
    p.add_argument("--out", help="folder for the service log (default runs/soak-TIME)")
    p.set_defaults(func=cmd_soak)
