"""A small kustomize equivalent for the features k8s/ uses: the tests' renderer where kubectl is not installed.

Supported (anything else in a kustomization raises, so the renderer never
silently differs from ``kubectl kustomize``):

- ``resources``: YAML files and folders holding a kustomization;
- ``patches``: JSON 6902 (a YAML list of ``add``/``replace``/``remove``/``test``
  operations, with a ``target``) and strategic merge patches of maps (lists are
  replaced whole; a list of maps, where kustomize would merge by key, raises);
- ``namespace``, ``labels`` with ``includeSelectors: false`` (metadata only);
- ``secretGenerator``/``configMapGenerator`` from ``literals`` with
  ``generatorOptions.disableNameSuffixHash: true``;
- ``images`` (``newName``/``newTag``/``digest`` on every ``containers``/``initContainers`` entry).

Order as in kustomize: sub-kustomizations are built first, then this one's
generators, patches, namespace, labels and images.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "patches",
    "namespace",
    "labels",
    "secretGenerator",
    "configMapGenerator",
    "generatorOptions",
    "images",
}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
}


class KustomizeError(ValueError):
    pass


def _kustomization(folder: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        if (folder / name).is_file():
            data = yaml.safe_load((folder / name).read_text()) or {}
            unknown = set(data) - SUPPORTED
            if unknown:
                raise KustomizeError(f"{folder}: unsupported kustomization fields {sorted(unknown)}")
            return data
    raise KustomizeError(f"{folder}: no kustomization file")


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ---------------------------------------------------------------- JSON 6902


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for p in parts:
        if isinstance(node, dict) and p in node:
            node = node[p]
        elif isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        else:
            raise KustomizeError(f"path {path!r} does not exist")
    return node


def apply_json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op["op"], op["path"]
        parts = _pointer(path)
        parent, last = _walk(doc, parts[:-1], path), parts[-1]
        if kind == "test":
            if _walk(doc, parts, path) != op["value"]:
                raise KustomizeError(f"test failed at {path!r}: {_walk(doc, parts, path)!r} != {op['value']!r}")
        elif kind in ("add", "replace"):
            value = copy.deepcopy(op["value"])
            if isinstance(parent, dict):
                if kind == "replace" and last not in parent:
                    raise KustomizeError(f"replace: path {path!r} does not exist")
                parent[last] = value
            elif isinstance(parent, list):
                if last == "-" and kind == "add":
                    parent.append(value)
                elif last.isdigit() and int(last) <= len(parent) - (kind == "replace"):
                    if kind == "add":
                        parent.insert(int(last), value)
                    else:
                        parent[int(last)] = value
                else:
                    raise KustomizeError(f"{kind}: bad index at {path!r}")
            else:
                raise KustomizeError(f"{kind}: parent of {path!r} is not a container")
        elif kind == "remove":
            _walk(doc, parts, path)
            if isinstance(parent, dict):
                del parent[last]
            else:
                del parent[int(last)]
        else:
            raise KustomizeError(f"unsupported JSON 6902 operation {kind!r}")
    return doc


# ---------------------------------------------------------------- strategic merge (maps only)


def _smp(base: Any, patch: Any, where: str) -> Any:
    if isinstance(patch, dict) and isinstance(base, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _smp(out[k], v, f"{where}.{k}")
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list) and any(isinstance(x, dict) for x in patch):
        raise KustomizeError(f"strategic merge of a list of maps at {where} is not supported here (use JSON 6902)")
    return copy.deepcopy(patch)


# ---------------------------------------------------------------- transformers


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    meta = doc.get("metadata", {})
    checks = {
        "group": group,
        "version": version,
        "kind": doc.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    unknown = set(target) - set(checks)
    if unknown:
        raise KustomizeError(f"unsupported patch target fields {sorted(unknown)}")
    return all(checks[k] == v for k, v in target.items())


def _patch(docs: list[dict[str, Any]], folder: Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise KustomizeError(f"unsupported patch fields {sorted(unknown)}")
    bodies = [
        b for b in yaml.safe_load_all((folder / entry["path"]).read_text() if "path" in entry else entry["patch"]) if b
    ]
    if len(bodies) == 1 and isinstance(bodies[0], list):  # JSON 6902
        body = bodies[0]
        if "target" not in entry:
            raise KustomizeError("a JSON 6902 patch needs a target")
        hits = [i for i, d in enumerate(docs) if _matches(d, entry["target"])]
        if not hits:
            raise KustomizeError(f"patch target {entry['target']} matches nothing")
        for i in hits:
            docs[i] = apply_json6902(docs[i], body)
        return docs
    for body in bodies:  # strategic merge patches, one per document
        target = entry.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
        hits = [i for i, d in enumerate(docs) if _matches(d, target)]
        if not hits:
            raise KustomizeError(f"patch target {target} matches nothing")
        for i in hits:
            patch = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
            patch["metadata"] = {k: v for k, v in patch.get("metadata", {}).items() if k != "name"}
            docs[i] = _smp(docs[i], patch, docs[i]["kind"])
    return docs


def _set_images(node: Any, images: list[dict[str, Any]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and "image" in c:
                        c["image"] = _new_image(c["image"], images)
            _set_images(value, images)
    elif isinstance(node, list):
        for value in node:
            _set_images(value, images)


def _new_image(image: str, images: list[dict[str, Any]]) -> str:
    name, tag = image, ""
    if "@" in image:
        name, tag = image.split("@", 1)
        tag = "@" + tag
    elif ":" in image.rsplit("/", 1)[-1]:
        name, t = image.rsplit(":", 1)
        tag = ":" + t
    for spec in images:
        unknown = set(spec) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise KustomizeError(f"unsupported images fields {sorted(unknown)}")
        if spec["name"] == name:
            name = spec.get("newName", name)
            if "digest" in spec:
                tag = "@" + spec["digest"]
            elif "newTag" in spec:
                tag = ":" + str(spec["newTag"])
            return name + tag
    return image


def _generate(kind: str, entry: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(entry) - {"name", "literals", "type"}
    if unknown:
        raise KustomizeError(f"unsupported {kind} generator fields {sorted(unknown)}")
    if not options.get("disableNameSuffixHash"):
        raise KustomizeError("generators need generatorOptions.disableNameSuffixHash: true here")
    data = dict(lit.split("=", 1) for lit in entry.get("literals", []))
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": entry["name"]}}
    if kind == "Secret":
        doc["type"] = entry.get("type", "Opaque")
        doc["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        doc["data"] = data
    return doc


def build(folder: str | Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize FOLDER`` would print (unsorted)."""
    folder = Path(folder)
    k = _kustomization(folder)
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        p = (folder / res).resolve()
        docs.extend(build(p) if p.is_dir() else _load_docs(p))
    options = k.get("generatorOptions", {})
    unknown = set(options) - {"disableNameSuffixHash"}
    if unknown:
        raise KustomizeError(f"unsupported generatorOptions {sorted(unknown)}")
    for entry in k.get("secretGenerator", []):
        docs.append(_generate("Secret", entry, options))
    for entry in k.get("configMapGenerator", []):
        docs.append(_generate("ConfigMap", entry, options))
    for entry in k.get("patches", []):
        docs = _patch(docs, folder, entry)
    if "namespace" in k:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d.setdefault("metadata", {})["namespace"] = k["namespace"]
    for spec in k.get("labels", []):
        if (
            spec.get("includeSelectors")
            or spec.get("includeTemplates")
            or set(spec) - {"pairs", "includeSelectors", "includeTemplates"}
        ):
            raise KustomizeError("only labels with includeSelectors/includeTemplates false are supported")
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(spec["pairs"])
    if k.get("images"):
        for d in docs:
            _set_images(d, k["images"])
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    dupes = {x for x in keys if keys.count(x) > 1}
    if dupes:
        raise KustomizeError(f"duplicate objects {sorted(map(str, dupes))}")
    return docs
