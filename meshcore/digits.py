"""ASCII decimal digits, which is what every number in our wire formats and configs is written in.

`str.isdigit()` is also true for "²" (which `int()` refuses, a crash where a 400 was meant) and
for "٣" (which `int()` reads as 3): neither is a number anyone meant.
"""

from __future__ import annotations


def is_digits(text: str) -> bool:
    """Non-empty, and only the characters 0-9."""
    return text.isascii() and text.isdigit()
