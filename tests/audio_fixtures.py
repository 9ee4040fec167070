"""Speech-like test audio made from numbers (generation shared with the load tests: :mod:`loadtest.audio`)."""

from __future__ import annotations

from loadtest.audio import FORMATS, speechlike, write

__all__ = ["FORMATS", "speechlike", "write"]
