"""Attacks on the service's door, from loopback, each bounded in bytes, connections and time.

Each function runs one attack against ``127.0.0.1:port`` and returns what the
service answered: ``{"statuses": {code: count}, ...}`` (0 for a connection
the service closed or refused without an answer), plus what the attack
measures (bytes the service took before it answered, connections still open
after a wait). ``l2grader soak`` runs them in turn while scoring normal
answers and sampling every process's memory.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HEAD = b"GET /v1/parts HTTP/1.1\r\nHost: s\r\n"
#: The attacks come from another loopback address than the soak's normal clients, so that per-client limits tell
#: them apart as they would tell apart two machines.
ATTACKER = "127.0.0.2"


def _connect(port: int, timeout: float) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(ATTACKER, 0))


def _status(head: bytes) -> int:
    return int(head[9:12]) if head.startswith(b"HTTP/1.") and head[9:12].isdigit() else 0


def _answer(s: socket.socket, wait_s: float = 10.0) -> int:
    """The status the service sends on ``s`` (0 if it closes without one or sends nothing in ``wait_s``)."""
    s.settimeout(wait_s)
    try:
        return _status(s.recv(4096))
    except OSError:
        return 0


def big_header(port: int, mb: float = 300, chunk: int = 1 << 16) -> dict:
    """One connection streams an unterminated header of up to ``mb`` MB; the service should stop it early."""
    sent = 0
    with _connect(port, 30) as s:
        s.sendall(HEAD + b"X-Big: ")
        s.settimeout(30)
        piece = b"a" * chunk
        try:
            while sent < mb * (1 << 20):
                s.sendall(piece)
                sent += chunk
        except OSError:
            pass
        status = _answer(s, 5)
    return {"statuses": {status: 1}, "bytes_sent_before_refusal": sent}


def many_headers(port: int, count: int = 20000) -> dict:
    """One request with ``count`` header fields."""
    with _connect(port, 30) as s:
        try:
            s.sendall(HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(count)) + b"\r\n")
        except OSError:
            pass
        return {"statuses": {_answer(s): 1}}


def held_connections(port: int, count: int = 600, partial: bool = True, hold_s: float = 30.0) -> dict:
    """``count`` connections that send part of a header once a second (slowloris; or nothing at all) for ``hold_s``.

    Returns the statuses they got and how many the service still held open at the end.
    """
    socks: list[socket.socket] = []
    statuses: Counter[int] = Counter()
    for _ in range(count):
        try:
            s = _connect(port, 5)
            if partial:
                s.sendall(HEAD)
            s.setblocking(False)
            socks.append(s)
        except OSError:
            statuses[0] += 1
    deadline = time.monotonic() + hold_s
    open_ = list(socks)
    while open_ and time.monotonic() < deadline:
        time.sleep(1.0)
        still = []
        for s in open_:
            try:
                data = s.recv(4096)
                statuses[_status(data)] += 1  # an answer (or b"": closed)
                continue
            except BlockingIOError:
                pass
            except OSError:
                statuses[0] += 1
                continue
            if partial:
                try:
                    s.send(b"X-a: b\r\n")
                except OSError:
                    statuses[0] += 1
                    continue
            still.append(s)
        open_ = still
    for s in socks:
        s.close()
    return {"statuses": dict(statuses), "still_open": len(open_), "connections": count}


def forwarded_spoof(port: int, key: str, count: int = 230, hold_s: float = 5.0) -> dict:
    """``count`` held scoring requests, each naming a new ``X-Forwarded-For``: the per-client limit must still count
    them as one client (429 beyond it)."""
    socks, statuses = [], Counter()
    for i in range(count):
        try:
            s = _connect(port, 5)
            s.sendall(
                b"POST /v1/score HTTP/1.1\r\nHost: s\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                + f"Authorization: Bearer {key}\r\nX-Forwarded-For: 198.51.{i // 250}.{i % 250 + 1}\r\n".encode()
                + b"Content-Length: 100000\r\n\r\n"
                + b"x" * 10
            )
            s.setblocking(False)
            socks.append(s)
        except OSError:
            statuses[0] += 1
    time.sleep(hold_s)
    for s in socks:
        try:
            statuses[_status(s.recv(4096))] += 1
        except BlockingIOError:
            statuses["held"] += 1
        except OSError:
            statuses[0] += 1
        s.close()
    return {"statuses": dict(statuses)}


def keyless_bodies(port: int, clients: int = 6, mb: float = 170) -> dict:
    """``clients`` connections without a key, each sending a body of ``mb`` MB (one byte short): refused unread."""
    statuses, taken = Counter(), []
    size = int(mb * (1 << 20))
    for _ in range(clients):
        sent = 0
        with _connect(port, 30) as s:
            try:
                s.sendall(
                    b"POST /v1/score HTTP/1.1\r\nHost: s\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    + f"Content-Length: {size}\r\n\r\n".encode()
                )
                s.settimeout(0.05)
                piece = b"x" * (1 << 16)
                while sent < size - 1:
                    s.sendall(piece[: min(len(piece), size - 1 - sent)])
                    sent += min(len(piece), size - 1 - sent)
                    try:
                        if s.recv(1, socket.MSG_PEEK):
                            break
                    except (TimeoutError, BlockingIOError):
                        pass
            except OSError:
                pass
            statuses[_answer(s, 5)] += 1
        taken.append(sent)
    return {"statuses": dict(statuses), "bytes_sent_before_refusal_max": max(taken)}


def garbage(port: int) -> dict:
    """Bytes that are not HTTP (a TLS hello to a plain port)."""
    with _connect(port, 10) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + uuid.uuid4().bytes * 4 + b"\r\n\r\n")
        return {"statuses": {_answer(s): 1}}


def _score(url: str, headers: dict, part: str, audio: bytes):
    import httpx

    try:
        return httpx.post(
            f"{url}/v1/score", headers=headers, data={"part": part}, files={"audio": ("a.wav", audio)}, timeout=300
        )
    except httpx.HTTPError:
        return None


def _code(r) -> int:
    return 0 if r is None else r.status_code


def adapter_swap_in_place(url: str, user: dict, admin: dict, source: Path, folder: Path) -> dict:
    """A part's adapter weights rewritten in place (same size, old modification time) after it was scored, then
    scored again, then registered again: the changed content must be refused (503 ``adapter_changed``) until the
    new ``PUT``, and scored under a new model id after it; nothing else."""
    import httpx

    from loadtest.audio import answer_bytes

    audio = answer_bytes(3, 1)
    part, copy = f"swap-{uuid.uuid4().hex[:8]}", folder / f"swap-{uuid.uuid4().hex[:8]}"
    shutil.copytree(source, copy)
    steps: dict[str, int] = {}
    try:
        put = httpx.put(f"{url}/v1/parts/{part}", headers=admin, json={"adapter": str(copy)}, timeout=300)
        steps["put"] = put.status_code
        steps["scored"] = _code(_score(url, user, part, audio))
        weights = copy / "adapter_model.safetensors"
        st = weights.stat()
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        # The replica still holding the old weights may score them (the version it loaded); one that loads the
        # files now must refuse them.
        steps["after_swap"] = _code(_score(url, user, part, audio))
        again = httpx.put(f"{url}/v1/parts/{part}", headers=admin, json={"adapter": str(copy)}, timeout=300)
        steps["put_again"] = again.status_code
        steps["new_model_id"] = int(again.status_code == 200 and again.json()["model_id"] != put.json()["model_id"])
        steps["scored_again"] = _code(_score(url, user, part, audio))
    finally:
        httpx.delete(f"{url}/v1/parts/{part}", headers=admin, timeout=60)
        shutil.rmtree(copy, ignore_errors=True)
    return {"statuses": dict(Counter(v for k, v in steps.items() if k != "new_model_id")), "steps": steps}


def delete_under_load(url: str, user: dict, admin: dict, source: Path, answers: int = 20) -> dict:
    """``answers`` answers of a part, then its ``DELETE`` while they are being scored: each answer gets 200 (accepted
    before the DELETE) or 404 (after), never a 5xx."""
    import httpx

    from loadtest.audio import answer_bytes

    audio = [answer_bytes(15, 100 + i) for i in range(answers)]
    part = f"drain-{uuid.uuid4().hex[:8]}"
    put = httpx.put(f"{url}/v1/parts/{part}", headers=admin, json={"adapter": str(source)}, timeout=300)
    with ThreadPoolExecutor(answers) as pool:
        futures = [pool.submit(_score, url, user, part, a) for a in audio]
        time.sleep(1.0)
        deleted = httpx.delete(f"{url}/v1/parts/{part}", headers=admin, timeout=60)
        codes = [_code(f.result()) for f in futures]
    return {"statuses": dict(Counter(codes)), "put": put.status_code, "delete": deleted.status_code}


def door_attacks(
    url: str, user: dict, admin: dict, adapter: Path | None, folder: Path
) -> list[tuple[str, Callable[[], dict]]]:
    """The attacks ``l2grader soak --attacks`` runs, in order, by name (``adapter``: one to copy for the part
    attacks, ``folder``: an adapter root to copy it into)."""
    port = int(url.rsplit(":", 1)[1])
    key = user["Authorization"].removeprefix("Bearer ")
    attacks = [
        ("big_header_300mb", lambda: big_header(port, 300)),
        ("headers_20000", lambda: many_headers(port, 20000)),
        ("slowloris_600", lambda: held_connections(port, 600, partial=True, hold_s=30)),
        ("idle_600", lambda: held_connections(port, 600, partial=False, hold_s=30)),
        ("forwarded_spoof_230", lambda: forwarded_spoof(port, key, 230)),
        ("keyless_bodies_6x170mb", lambda: keyless_bodies(port, 6, 170)),
        ("not_http", lambda: garbage(port)),
    ]
    if adapter is not None:
        attacks += [
            ("adapter_swap_in_place", lambda: adapter_swap_in_place(url, user, admin, adapter, folder)),
            ("delete_under_load_20", lambda: delete_under_load(url, user, admin, adapter, 20)),
        ]
    return attacks
