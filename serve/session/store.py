"""The output folder of a session: answer parts committed whole, what is done, the candidates table.

Layout under ``--out`` (a local folder or any URI ``pyarrow.fs`` opens)::

    session.json           what the folder scores: the manifest and its ids' hash, the parts' model ids
    answers/part-*.parquet one row per answer (serve.session.schema.ANSWER_SCHEMA), written in parts
    candidates.parquet     one row per candidate (serve.session.schema.CANDIDATES_SCHEMA), made from the
                           answers at the end of a run

A part is written under a name starting with ``.`` and renamed once complete
(an object store's upload appears whole on close), so a stopped run leaves
only complete parts; a new run reads their ``response_id`` column (the done
set), skips those answers and deletes leftovers. Every answer is in exactly
one committed part. An answer whose scoring failed in a way that may pass
another time (``retryable``) is taken out of its part (rewritten whole under
the same name) by the next run, which scores it again.

Nothing is created before a run has checked the manifest and the folder (a
refused run leaves no folder behind).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq

from serve.grading.answers import FAILURE_KINDS, candidate_result
from serve.grading.candidate_calibration import CandidateIntervals
from serve.grading.config import CandidateConfig
from serve.grading.parts import Part
from serve.session.schema import ANSWER_SCHEMA, CANDIDATES_SCHEMA, FAILED, SCORED, result_of_row
from serve.session.sources import local_path

ANSWERS_DIR = "answers"
CANDIDATES_FILE = "candidates.parquet"
SESSION_FILE = "session.json"


class OutputError(ValueError):
    """The output folder cannot be used for this session (it holds another one, or a part is unreadable)."""


def ids_digest(ids: Iterable[str]) -> str:
    """A digest of a set of response ids (order does not matter)."""
    h = hashlib.sha256()
    for rid in sorted(ids):
        h.update(rid.encode())
        h.update(b"\0")
    return h.hexdigest()


class OutputDir:
    """The output folder on its filesystem."""

    def __init__(self, location: str):

        path = local_path(location)
        if path is not None:
            self.fs, self.root = pyarrow.fs.LocalFileSystem(), str(path.resolve())
        else:
            self.fs, self.root = pyarrow.fs.FileSystem.from_uri(location)
        self.location = location

    def _create(self) -> None:
        self.fs.create_dir(self._path(ANSWERS_DIR), recursive=True)

    def _path(self, *names: str) -> str:
        return "/".join([self.root.rstrip("/"), *names])

    def _write_atomic(self, name: str, data: bytes) -> None:
        self._create()
        tmp = self._path(f".{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self._path(name))

    # ------------------------------------------------------------ what the folder scores

    def session_identity(self) -> dict:
        """What the folder scores, as its first run recorded it (empty before that)."""
        path = self._path(SESSION_FILE)
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return {}
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read())

    def check_session(self, identity: dict) -> None:
        """Refuse a folder that holds another session (another manifest or model) or anything that is not a
        session's output; creates nothing (:meth:`record_session` does, once the run starts)."""

        info = self.fs.get_file_info(self.root)
        if info.type == pyarrow.fs.FileType.File:
            raise OutputError(f"{self.location} is a file; give a folder as --out")
        before = self.session_identity() if info.type == pyarrow.fs.FileType.Directory else {}
        if not before:
            foreign = self._foreign_entries() if info.type == pyarrow.fs.FileType.Directory else []
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise OutputError(
                    f"{self.location} is not empty and holds no session ({shown}); give a new or empty --out"
                )
            return
        changed = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
        if changed:
            raise OutputError(
                f"{self.location} holds the results of another session (changed: {', '.join(changed)}); "
                "give a new --out, or delete it to start again"
            )

    def _foreign_entries(self) -> list[str]:
        """What a folder without ``session.json`` holds besides an empty ``answers`` folder."""
        found = []
        for entry in self.fs.get_file_info(pyarrow.fs.FileSelector(self.root)):
            if entry.base_name == ANSWERS_DIR and entry.type == pyarrow.fs.FileType.Directory:
                found += [
                    f"{ANSWERS_DIR}/{e.base_name}" for e in self.fs.get_file_info(pyarrow.fs.FileSelector(entry.path))
                ]
            else:
                found.append(entry.base_name)
        return sorted(found)

    def record_session(self, identity: dict) -> None:
        """Record what this folder scores (the first run's, once its checks passed)."""
        if not self.session_identity():
            self._write_atomic(SESSION_FILE, json.dumps(identity, indent=2, sort_keys=True).encode())
        self._create()

    # ------------------------------------------------------------ parts

    def part_paths(self) -> list[str]:
        """Committed answer parts (leftovers of a stopped run are deleted)."""

        if self.fs.get_file_info(self._path(ANSWERS_DIR)).type != pyarrow.fs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self._path(ANSWERS_DIR)))
        parts = []
        for info in infos:
            if info.base_name.startswith("."):
                self.fs.delete_file(info.path)
            elif info.base_name.endswith(".parquet"):
                parts.append(info.path)
        for info in self.fs.get_file_info(pyarrow.fs.FileSelector(self.root)):
            if info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
                self.fs.delete_file(info.path)
        return sorted(parts)

    def read_parts(self, columns: list[str]):
        """The committed answers (the given columns) as one ``pyarrow.Table``."""

        tables = []
        for path in self.part_paths():
            try:
                tables.append(pq.read_table(path, columns=columns, filesystem=self.fs))
            except (OSError, pa.ArrowInvalid) as e:
                raise OutputError(f"answer part {path} is unreadable ({e}); delete it and run again") from None
        return pa.concat_tables(tables) if tables else ANSWER_SCHEMA.empty_table().select(columns)

    def read_all(self) -> list[dict]:
        """Every committed answer row (all columns)."""
        return self.read_parts(ANSWER_SCHEMA.names).to_pylist()

    def done_ids(self) -> set[str]:
        """Response ids already written."""
        return set(self.read_parts(["response_id"]).column("response_id").to_pylist())

    def retryable(self) -> int:
        """Committed answers whose scoring failed in a way that may pass another time."""
        t = self.read_parts(["status", "error_kind"])
        return sum(1 for s, k in zip(t["status"].to_pylist(), t["error_kind"].to_pylist()) if _retryable(s, k))

    def drop_retryable(self) -> int:
        """Take the answers that may pass another time out of their parts (each rewritten whole, under its own name,
        so that every answer stays in exactly one part whenever the run stops), to be scored again; how many."""
        dropped = 0
        for path in self.part_paths():
            table = pq.read_table(path, filesystem=self.fs)
            retry = pa.array(
                [_retryable(s, k) for s, k in zip(table["status"].to_pylist(), table["error_kind"].to_pylist())],
                pa.bool_(),
            )
            n = pc.sum(retry).as_py() or 0
            if not n:
                continue
            sink = pa.BufferOutputStream()
            pq.write_table(table.filter(pc.invert(retry)), sink)
            self._write_atomic(path[len(self.root.rstrip("/")) + 1 :], sink.getvalue().to_pybytes())
            dropped += n
        return dropped

    def part_writer(self, rows_per_part: int, max_wait_s: float) -> PartWriter:
        return PartWriter(self, rows_per_part, max_wait_s)

    # ------------------------------------------------------------ candidates

    def write_candidates(
        self,
        parts: Mapping[str, Part],
        rule: CandidateConfig | None = None,
        intervals: CandidateIntervals | None = None,
    ) -> int:
        """Make ``candidates.parquet`` from all committed answers (each candidate's result as the batch endpoint's
        ``overall``, by the exam's ``rule``: the config's ``candidate:`` section, the interval from ``intervals``:
        :func:`serve.grading.parts.candidate_intervals_of`); the number of candidates."""

        by_candidate: dict[str, list[dict]] = {}
        for a in self.read_parts([c for c in ANSWER_SCHEMA.names if c != "retryable"]).to_pylist():
            by_candidate.setdefault(a["candidate_id"], []).append(a)
        levels = {name: part.config.levels for name, part in parts.items()}
        rows = []
        for cid in sorted(by_candidate, key=lambda c: (c is None, c or "")):
            group = by_candidate[cid]
            overall = candidate_result([result_of_row(a) for a in group], levels, rule, intervals)
            parts_scored = sorted({a["part"] for a in group if a["status"] == SCORED})
            rows.append({"candidate_id": cid, "answers": len(group), "parts": parts_scored, **overall.model_dump()})
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA), sink)
        self._write_atomic(CANDIDATES_FILE, sink.getvalue().to_pybytes())
        return len(rows)


def _retryable(status: str, kind: str | None) -> bool:
    return status == FAILED and FAILURE_KINDS.get(kind or "", True)


class PartWriter:
    """Collects answer rows and commits them as a part every ``rows_per_part`` rows or ``max_wait_s`` seconds."""

    def __init__(self, out: OutputDir, rows_per_part: int, max_wait_s: float):
        self.out, self.rows_per_part, self.max_wait_s = out, rows_per_part, max_wait_s
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.pending: list = []
        self.pending_rows = 0
        self.parts = 0
        self.since = time.monotonic()

    def add(self, table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.rows_per_part or time.monotonic() - self.since >= self.max_wait_s:
            self.flush()

    def flush(self) -> None:

        self.since = time.monotonic()
        if not self.pending_rows:
            return
        sink = pa.BufferOutputStream()
        pq.write_table(pa.concat_tables(self.pending).cast(ANSWER_SCHEMA), sink)
        self.out._write_atomic(
            f"{ANSWERS_DIR}/part-{self.run_id}-{self.parts:05d}.parquet", sink.getvalue().to_pybytes()
        )
        self.parts += 1
        self.pending, self.pending_rows = [], 0
