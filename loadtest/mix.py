"""Answer lengths of an exam platform's traffic and how they are mixed."""

from __future__ import annotations

LENGTHS = {"short": (10.0, 20.0), "medium": (30.0, 60.0), "long": (180.0, 300.0)}
DEFAULT_MIX = "short:80,medium:17,long:3"


def parse_mix(text: str) -> dict[str, float]:
    """``short:80,medium:17,long:3`` -> weights by length class (short 10-20 s, medium 30-60 s, long 3-5 min)."""
    mix = {}
    for item in text.split(","):
        name, _, weight = item.strip().partition(":")
        if name not in LENGTHS:
            raise ValueError(f"unknown answer length {name!r} in mix {text!r} (known: {', '.join(LENGTHS)})")
        mix[name] = float(weight or 1)
    if not mix or sum(mix.values()) <= 0:
        raise ValueError(f"mix {text!r} has no positive weight")
    return mix
