"""Answer lengths and exam parts of an exam platform's traffic and how they are mixed."""

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


def parse_parts(text: str) -> dict[str, float]:
    """``a:40,b:20,c`` -> weights by part (a missing weight is 1); ``""`` -> ``{}`` (every part, equally)."""
    parts: dict[str, float] = {}
    for item in text.split(","):
        name, _, weight = item.strip().partition(":")
        if not name:
            continue
        try:
            parts[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"part {name!r} has a weight that is not a number: {weight!r}") from None
        if parts[name] < 0:
            raise ValueError(f"part {name!r} has a negative weight")
    if parts and sum(parts.values()) <= 0:
        raise ValueError(f"parts {text!r} have no positive weight")
    return parts
