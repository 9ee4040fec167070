"""Write docs/api.md's two answer examples from what a running service answers.

    python scripts/api_examples.py --url http://127.0.0.1:8000 [--api-key KEY] [--doc docs/api.md]

Against the demo config (``l2grader serve --config configs/demo.yaml``): one
20 s answer to ``interview`` (``POST /v1/score``), then a batch of a 20 s answer
to ``long_turn`` and a silent one to ``interview``. Floats are rounded to 4
places; the first two ``json`` blocks of the page are replaced, the rest of it
is left as it is.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.audio import encode, speechlike  # noqa: E402


def rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "api.md")
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    answer = encode(speechlike(20.0, 16000, seed=7), 16000)
    single = httpx.post(
        f"{args.url}/v1/score",
        data={"part": "interview", "response_id": "r-001"},
        files={"audio": ("answer.wav", answer, "audio/wav")},
        headers=headers,
        timeout=300,
    )
    single.raise_for_status()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    silent = encode(np.zeros(3 * 16000, np.float32), 16000)
    batch = httpx.post(
        f"{args.url}/v1/score/batch",
        json={
            "candidate_id": "c-42",
            "answers": [
                {"part": "long_turn", "response_id": "r-001", "audio_base64": b64(answer)},
                {"part": "interview", "response_id": "r-002", "audio_base64": b64(silent)},
            ],
        },
        headers=headers,
        timeout=300,
    )
    batch.raise_for_status()
    blocks = iter(json.dumps(rounded(r.json()), indent=1) for r in (single, batch))
    text = args.doc.read_text()
    text = re.sub(r"```json\n.*?\n```", lambda m: f"```json\n{next(blocks)}\n```", text, count=2, flags=re.S)
    args.doc.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
