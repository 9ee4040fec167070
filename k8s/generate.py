"""Render each overlay's serve config from its grader config (one source of truth).

For every overlay in :data:`OVERLAYS` this writes
``k8s/overlays/<name>/rayservice-serve-config.yaml``, the patch that
:func:`serve.service.kuberay.render_patch` makes of the overlay's grader
config (serve config, worker-group bounds and Ray resources, Ray settings).

Run it after editing a config (``--check`` exits 1 if a committed file is stale)::

    .venv/bin/python k8s/generate.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from serve.service.kuberay import IMAGE_CONFIG_DIR, PATCH_FILE, patch_ops, render_patch  # noqa: E402, F401
from serve.service.settings import load_service_config  # noqa: E402

#: overlay name -> the grader config (relative to the repository) it ships.
OVERLAYS: dict[str, str] = {
    "gpu": "configs/qwen2-audio-7b.yaml",
    "cpu-demo": "configs/k8s-demo.yaml",
}


def render(name: str) -> str:
    """The text of an overlay's generated patch."""
    return render_patch(load_service_config(REPO / OVERLAYS[name]), OVERLAYS[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is missing or stale")
    args = parser.parse_args(argv)
    stale = []
    for name in OVERLAYS:
        path = REPO / "k8s" / "overlays" / name / PATCH_FILE
        text = render(name)
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(str(path.relative_to(REPO)))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}", file=sys.stderr)
    if stale:
        print(f"stale: {', '.join(stale)} (run .venv/bin/python k8s/generate.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
