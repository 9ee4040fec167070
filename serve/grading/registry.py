"""The live set of exam parts: the config's parts plus admin changes persisted to a file.

Every door resolves parts here: the service's replicas, ``l2grader score``,
``score-session`` and ``evaluate``, so a part added with ``PUT /v1/parts`` is
scored in bulk under the same model id as over HTTP.

Admin calls (``PUT``/``DELETE /v1/parts/{part}``) change the registry at run
time; the changes are written atomically to the registry file (the config's
``serving.registry_file``, default ``<config>.registry.json`` beside the config:
:func:`serve.service.settings.part_registry`) so a restart keeps them. Every
replica, ingress and scorer alike, re-reads the file when it changes, so
replicas agree: the ingress maps a part to its model id, a scorer replica maps
the model id back to the part's config and adapter.

Each part is served under its model id (:func:`serve.grading.parts.model_id`):
a replaced adapter gets a new id, and scorer replicas load it on first use.
The registry remembers the versions it has seen, so requests already in
flight under a replaced id still resolve and finish with the old weights.
Give each adapter version its own folder: the id names content, not a path.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from serve.grading.adapter_files import AdapterError
from serve.grading.config import GraderConfig, PartConfig, UnknownPartError
from serve.grading.parts import Part, check_part

#: Replaced part versions kept resolvable for requests still in flight.
RETIRED_VERSIONS = 64


class UnknownModelIdError(KeyError):
    """A model id names no part version this registry knows (replaced before this replica saw it, or made up)."""


def default_registry_file(config_path: str | Path) -> Path:
    p = Path(config_path).resolve()
    return p.with_name(p.stem + ".registry.json")


class PartRegistry:
    """Parts of the config overlaid with persisted admin changes (``None`` marks a removed part)."""

    def __init__(self, cfg: GraderConfig, path: Path, adapter_roots: Sequence[Path] | None = None):
        """The config's parts with the changes persisted at ``path``; admin calls take adapters from inside
        ``adapter_roots`` only (default: the folders of the config's adapters)."""
        self.cfg, self.path = cfg, Path(path)
        self._adapter_roots = adapter_roots
        self._lock = threading.Lock()
        self._mtime: int | None = None
        self._loaded = False
        self._overrides: dict[str, PartConfig | None] = {}
        self._parts: dict[str, Part] = {}
        self._versions: OrderedDict[str, Part] = OrderedDict()  # model id -> part, current and retired
        self.refresh()

    # -- reading

    def refresh(self, force: bool = False) -> None:
        """Re-read the persisted changes if the file changed since the last read (``force``: and check every
        adapter again, which re-hashes those whose files changed)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if self._loaded and mtime == self._mtime and not force:
            return
        overrides: dict[str, PartConfig | None] = {}
        if mtime is not None:
            raw = json.loads(self.path.read_text())
            overrides = {k: None if v is None else PartConfig.model_validate(v) for k, v in raw.items()}
        merged: dict[str, PartConfig | None] = {**self.cfg.parts, **overrides}
        parts = {name: self.check(name, pcfg) for name, pcfg in merged.items() if pcfg is not None}
        with self._lock:
            self._overrides, self._mtime, self._parts, self._loaded = overrides, mtime, parts, True
            for part in parts.values():
                self._remember(part)

    def _remember(self, part: Part) -> None:
        self._versions[part.model_id] = part
        self._versions.move_to_end(part.model_id)
        current = {p.model_id for p in self._parts.values()}
        retired = [mid for mid in self._versions if mid not in current]
        for mid in retired[: max(0, len(retired) - RETIRED_VERSIONS)]:
            del self._versions[mid]

    def get(self, part: str) -> Part:
        """The part; :class:`UnknownPartError` (naming the parts there are and where each comes from) if none."""
        self.refresh()
        try:
            return self._parts[part]
        except KeyError:
            raise UnknownPartError(part, self.known(), self._parts) from None

    def known(self) -> list[str]:
        """The registered parts, each with where it comes from: the config, or an admin change (``PUT``)."""
        out = []
        for name in sorted(self._parts):
            if name not in self._overrides:
                out.append(f"{name} (config)")
            elif name in self.cfg.parts:
                out.append(f"{name} (config, replaced with PUT /v1/parts)")
            else:
                out.append(f"{name} (added with PUT /v1/parts)")
        return out

    def entries(self) -> dict[str, Part]:
        self.refresh()
        return dict(self._parts)

    def names(self) -> frozenset[str]:
        """The parts registered at the last read (no re-read: cheap enough for every metric label)."""
        return frozenset(self._parts)

    def by_model_id(self, model_id: str) -> Part:
        """The part version a model id names (current or recently replaced); :class:`UnknownModelIdError` if none."""
        if model_id not in self._versions:
            self.refresh(force=True)  # another process may have hashed adapter files that changed since
        try:
            return self._versions[model_id]
        except KeyError:
            raise UnknownModelIdError(model_id) from None

    # -- admin changes

    def check(self, part: str, pcfg: PartConfig) -> Part:
        """The part with its adapter checked against the engine's rank limit (``AdapterError`` otherwise)."""
        return check_part(part, pcfg, self.cfg.engine.max_lora_rank)

    def adapter_roots(self) -> list[Path]:
        """Folders admin calls take adapters from (the ones given, else those of the config's adapters)."""
        roots = self._adapter_roots
        if roots is None:
            holders = [h for p in self.cfg.parts.values() for h in (p, *p.aspects.values())]
            roots = sorted({h.adapter.parent for h in holders if h.adapter is not None})
        return [Path(os.path.realpath(r)) for r in roots]

    def _admitted_path(self, adapter: Path, what: str) -> Path:
        """``adapter`` resolved, if it lies inside an adapter root (``AdapterError`` otherwise)."""
        if not adapter.is_absolute():
            raise AdapterError(f"{what} must be an absolute path (as the service's machines see it)")
        real = Path(os.path.realpath(adapter))
        if not any(real.is_relative_to(root) for root in self.adapter_roots()):
            raise AdapterError(f"{what} path is outside the folders adapters may come from (serving.adapter_roots)")
        return real

    def admit(self, part: str, pcfg: PartConfig) -> Part:
        """An admin's new part, checked: its adapters (its own, its aspects') must lie inside an adapter root once
        symlinks are resolved.

        The answer for a path outside the roots is the same whether or not it
        exists; the part keeps the resolved paths, so a symlink changed later
        cannot point it elsewhere.
        """
        if pcfg.adapter is not None:
            pcfg = pcfg.model_copy(update={"adapter": self._admitted_path(pcfg.adapter, "the adapter")})
        aspects = {
            name: a
            if a.adapter is None
            else a.model_copy(update={"adapter": self._admitted_path(a.adapter, f"aspect {name!r}'s adapter")})
            for name, a in pcfg.aspects.items()
        }
        if aspects != pcfg.aspects:
            pcfg = pcfg.model_copy(update={"aspects": aspects})
        return self.check(part, pcfg)

    def put(self, part: str | Part, pcfg: PartConfig | None = None) -> Part:
        """Register or replace a part and persist the change; takes a checked :class:`Part` or a name and config."""
        checked = part if isinstance(part, Part) else self.check(part, pcfg)
        self._write({**self._overrides, checked.part: checked.config})
        return checked

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
        self._loaded = False  # force a re-read
        self.refresh()
