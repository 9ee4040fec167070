"""The live set of exam parts: the config's parts plus admin changes persisted to a file.

Admin calls (``PUT``/``DELETE /v1/parts/{part}``) change the registry at run
time; the changes are written atomically to ``serving.registry_file`` (default:
``<config>.registry.json`` beside the config) so a restart keeps them. Every
ingress replica re-reads the file when it changes, so replicas agree.

Each part is served under a model id ``part@<adapter hash>``: a replaced
adapter gets a new id (scorer replicas load it on first use, while requests
already in flight under the old id finish with the old weights). Give each
adapter version its own folder: the id names content, not a path.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from adapters.lora import adapter_hash, adapter_rank, check_adapter_dir
from serve.config import GraderConfig, PartConfig, UnknownPartError


@dataclass(frozen=True)
class PartEntry:
    """A registered part and the id its requests are routed by."""

    part: str
    config: PartConfig
    adapter_hash: str | None

    @property
    def model_id(self) -> str:
        """Multiplexing key: the part and the content of its adapter."""
        return f"{self.part}@{self.adapter_hash or 'base'}"


def default_registry_file(config_path: str | Path) -> Path:
    p = Path(config_path).resolve()
    return p.with_name(p.stem + ".registry.json")


class PartRegistry:
    """Parts of the config overlaid with persisted admin changes (``None`` marks a removed part)."""

    def __init__(self, cfg: GraderConfig, path: Path):
        self.cfg, self.path = cfg, path
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._overrides: dict[str, PartConfig | None] = {}
        self._entries: dict[str, PartEntry] = {}
        self._hashes: dict[Path, str] = {}
        self.refresh()

    # -- reading

    def refresh(self) -> None:
        """Re-read the persisted changes if the file changed since the last read."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime == self._mtime and self._entries:
            return
        overrides: dict[str, PartConfig | None] = {}
        if mtime is not None:
            raw = json.loads(self.path.read_text())
            overrides = {k: None if v is None else PartConfig.model_validate(v) for k, v in raw.items()}
        with self._lock:
            self._overrides, self._mtime = overrides, mtime
            self._entries = self._build()

    def _hash(self, adapter: Path | None) -> str | None:
        if adapter is None:
            return None
        if adapter not in self._hashes:
            self._hashes[adapter] = adapter_hash(adapter)
        return self._hashes[adapter]

    def _build(self) -> dict[str, PartEntry]:
        merged: dict[str, PartConfig | None] = {**self.cfg.parts, **self._overrides}
        return {
            part: PartEntry(part, pcfg, self._hash(pcfg.adapter)) for part, pcfg in merged.items() if pcfg is not None
        }

    def get(self, part: str) -> PartEntry:
        """The part's entry; :class:`UnknownPartError` if it is not registered."""
        self.refresh()
        try:
            return self._entries[part]
        except KeyError:
            raise UnknownPartError(part, sorted(self._entries)) from None

    def entries(self) -> dict[str, PartEntry]:
        self.refresh()
        return dict(self._entries)

    # -- admin changes

    def validate(self, part: str, pcfg: PartConfig) -> PartEntry:
        """Check an adapter folder before it is registered (raises ``AdapterError``/``ValueError``)."""
        if pcfg.adapter is not None:
            check_adapter_dir(pcfg.adapter)
            rank = adapter_rank(pcfg.adapter)
            if rank > self.cfg.engine.max_lora_rank:
                raise ValueError(f"adapter rank {rank} exceeds engine.max_lora_rank {self.cfg.engine.max_lora_rank}")
            self._hashes.pop(pcfg.adapter, None)  # re-hash: the folder may hold new weights
        return PartEntry(part, pcfg, self._hash(pcfg.adapter))

    def put(self, part: str, pcfg: PartConfig) -> PartEntry:
        """Register or replace a part and persist the change."""
        entry = self.validate(part, pcfg)
        self._write({**self._overrides, part: pcfg})
        return entry

    def delete(self, part: str) -> None:
        """Remove a part (config parts too) and persist the change."""
        self.get(part)
        self._write({**self._overrides, part: None})

    def _write(self, overrides: dict[str, PartConfig | None]) -> None:
        data = {k: None if v is None else v.model_dump(mode="json") for k, v in overrides.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".registry-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, self.path)
        self._mtime = None  # force a re-read
        self.refresh()
