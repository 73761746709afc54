"""Durations as Istio's YAML writes them: Go's ``time.ParseDuration`` syntax (``10s``, ``1.5s``,
``250ms``, ``3m``, ``1h30m``), which is what a protobuf Duration field accepts in Istio's CRDs.
"""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")


class DurationError(ValueError):
    """Not a duration; the message says what one looks like."""


def parse_duration(text: str) -> float:
    """Seconds in `text`. Negative durations and a bare number (no unit) are errors."""
    if not text:
        raise DurationError("empty duration")
    seconds = 0.0
    pos = 0
    while pos < len(text):
        part = _PART.match(text, pos)
        if part is None:
            raise DurationError(
                f"{text!r} is not a duration: expected numbers with units such as 10s, 250ms, "
                "1.5s, 3m or 1h"
            )
        seconds += float(part.group(1)) * _UNITS[part.group(2)]
        pos = part.end()
    return seconds
