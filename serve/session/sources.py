"""Where a session's answers come from: the manifest and the audio files it names.

The manifest has one row per answer with the columns :data:`COLUMNS`, as CSV,
JSON Lines or Parquet (a file or a folder of Parquet files), on a local path
or any URI that ``pyarrow.fs`` opens (``s3://``, ``gs://``, ``file://``...).
Every column is read as text (``0042`` stays ``0042``). An ``audio`` entry is a
local path, a ``file://`` URI or any other URI ``pyarrow.fs`` opens; a relative
path is taken from the manifest's folder.
"""

from __future__ import annotations

import functools
import posixpath
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from serve.grading.audio import AudioError
from serve.grading.config import UnknownPartError

#: The manifest's columns, all text.
COLUMNS = ("response_id", "candidate_id", "part", "audio")

FORMATS = {".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet"}


class ManifestError(ValueError):
    """The manifest cannot be read or breaks a rule that concerns it as a whole (columns, ids)."""


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` (a Windows drive letter is not a scheme)."""
    return "://" in location and len(location.split("://", 1)[0]) > 1


def local_path(location: str) -> Path | None:
    """The local path of a plain path or a ``file://`` URI; None for any other URI."""
    if not is_uri(location):
        return Path(location).expanduser()
    parsed = urlparse(location)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def manifest_format(location: str) -> str:
    """``csv``, ``json`` or ``parquet``, from the name (a folder is a Parquet dataset)."""
    path = local_path(location)
    if path is not None and path.is_dir():
        return "parquet"
    suffix = posixpath.splitext(location.rstrip("/"))[1].lower()
    if suffix not in FORMATS:
        if not suffix:  # a prefix in a bucket: a Parquet dataset
            return "parquet"
        raise ManifestError(f"manifest {location}: unknown format {suffix!r} (use .csv, .jsonl or .parquet)")
    return FORMATS[suffix]


def audio_base(manifest: str) -> str:
    """What a relative audio path in the manifest is relative to: the manifest's folder (or the folder itself)."""
    path = local_path(manifest)
    if path is not None:
        path = path.resolve()
        return str(path if path.is_dir() else path.parent)
    parsed = manifest.rstrip("/")
    return (
        parsed
        if manifest_format(manifest) == "parquet" and not parsed.endswith(".parquet")
        else posixpath.dirname(parsed)
    )


def resolve_audio(audio: str, base: str) -> str:
    """An audio entry as an absolute path or URI."""
    if is_uri(audio) or Path(audio).expanduser().is_absolute():
        return audio
    return str(Path(base) / audio) if not is_uri(base) else f"{base.rstrip('/')}/{audio}"


#: URI schemes whose paths name a bucket first (``s3://bucket/key`` -> ``bucket/key`` in ``pyarrow.fs``).
BUCKET_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az")


@functools.lru_cache(maxsize=64)
def _filesystem(scheme: str, netloc: str):
    """One ``pyarrow.fs`` filesystem per scheme and bucket/host (making one may cost a network call)."""

    return pyarrow.fs.FileSystem.from_uri(f"{scheme}://{netloc}/")[0]


def _open(location: str):
    """(filesystem, path in it) of a URI that is not local."""
    parsed = urlparse(location)
    fs = _filesystem(parsed.scheme, parsed.netloc)
    path = unquote(parsed.path)
    return fs, (parsed.netloc + path if parsed.scheme in BUCKET_SCHEMES else path)


def read_audio(location: str, max_bytes: int) -> bytes:
    """The bytes of an audio file; :class:`AudioError` ``unreadable`` (missing, no access) or ``too_large``."""
    path = local_path(location)
    try:
        if path is not None:
            if not path.is_file():
                raise AudioError(
                    "unreadable", f"cannot read {location}: " + ("not a file" if path.exists() else "no such file")
                )
            size = path.stat().st_size
            if size > max_bytes:
                raise AudioError(
                    "too_large", f"{location} holds {size} bytes: more than the {max_bytes} bytes accepted"
                )
            return path.read_bytes()

        fs, fs_path = _open(location)
        info = fs.get_file_info(fs_path)
        if info.type != pyarrow.fs.FileType.File:
            missing = info.type == pyarrow.fs.FileType.NotFound
            raise AudioError("unreadable", f"cannot read {location}: " + ("no such file" if missing else "not a file"))
        if info.size is not None and info.size > max_bytes:
            raise AudioError(
                "too_large", f"{location} holds {info.size} bytes: more than the {max_bytes} bytes accepted"
            )
        with fs.open_input_stream(fs_path) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise AudioError("too_large", f"{location} holds more than the {max_bytes} bytes accepted")
        return data
    except AudioError:
        raise
    except (OSError, ValueError) as e:
        raise AudioError("unreadable", f"cannot read {location}: {getattr(e, 'strerror', None) or e}") from None


def check_manifest_location(location: str) -> str:
    """The manifest's format; :class:`ManifestError` for an unknown format or a local file that is not there."""
    fmt = manifest_format(location)
    path = local_path(location)
    if path is not None and not path.exists():
        raise ManifestError(f"manifest {location} not found")
    return fmt


def load_manifest(location: str) -> pa.Table:
    """The manifest as a table of :data:`COLUMNS` (text), read here (before Ray starts) and checked as a whole:
    :class:`ManifestError` when it cannot be read, has no rows, lacks a column, or has an empty or repeated
    ``response_id`` (the output's key)."""

    fmt = check_manifest_location(location)
    path = local_path(location)
    try:
        if path is not None:
            fs, where = pyarrow.fs.LocalFileSystem(), str(path.resolve())
        else:
            fs, where = pyarrow.fs.FileSystem.from_uri(location)
        if fmt == "parquet":
            table = pq.read_table(where, filesystem=fs)
        else:
            with fs.open_input_stream(where) as f:
                if fmt == "csv":
                    table = pacsv.read_csv(
                        f,
                        convert_options=pacsv.ConvertOptions(
                            column_types={c: pa.string() for c in COLUMNS}, strings_can_be_null=False
                        ),
                    )
                else:
                    # every column as text ("0042" stays "0042"); a missing field is null
                    table = pajson.read_json(
                        f,
                        parse_options=pajson.ParseOptions(
                            explicit_schema=pa.schema([(c, pa.string()) for c in COLUMNS]),
                            unexpected_field_behavior="ignore",
                        ),
                    )
    except (OSError, pa.ArrowException, ValueError) as e:
        raise ManifestError(f"cannot read the manifest {location}: {first_line(e)}") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    absent = [
        c for c in COLUMNS if c in table.column_names and table.num_rows and table[c].null_count == table.num_rows
    ]
    if missing or absent:
        raise ManifestError(
            f"the manifest lacks the column(s) {', '.join(missing + absent)} (it needs {', '.join(COLUMNS)})"
        )
    try:
        table = pa.table({c: table[c].cast(pa.string()) for c in COLUMNS})
    except pa.ArrowException as e:
        raise ManifestError(f"cannot read the manifest {location}: {first_line(e)}") from None
    if not table.num_rows:
        raise ManifestError(f"the manifest {location} has no rows: nothing to score")
    ids = table["response_id"].to_pylist()
    empty = sum(1 for rid in ids if not rid)
    if empty:
        raise ManifestError(f"{empty} row(s) of the manifest have no response_id (every answer needs a unique one)")
    repeated = [rid for rid, n in Counter(ids).items() if n > 1]
    if repeated:
        shown = ", ".join(repr(r[:64]) for r in repeated[:5])
        raise ManifestError(f"{len(repeated)} response_id(s) appear more than once in the manifest, e.g. {shown}")
    return table


def check_parts(table: pa.Table, known: list[str]) -> list[str]:
    """What to say of the manifest's part names: one line per unknown part (its rows, and the part it may mean);
    :class:`ManifestError` when no row names a registered part (nothing could be scored)."""
    counts = Counter(p for p in table["part"].to_pylist() if p)
    unknown = {p: n for p, n in counts.items() if p not in known}
    lines = [f"{n} row(s) name an {UnknownPartError(p, sorted(known))}" for p, n in sorted(unknown.items())]
    if table.num_rows and len(unknown) == len(counts):
        why = "; ".join(lines) if lines else "every row's part is empty"
        raise ManifestError(f"no row of the manifest names a registered part: {why}")
    return lines


def first_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e.__cause__ or e
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return (lines[-1] if lines else type(cause).__name__)[:300]
