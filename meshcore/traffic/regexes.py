"""Regular expressions from user config (route matches, ``uriRegexRewrite``), run by RE2 as
Envoy runs them: RE2's syntax, and time linear in the text whatever the pattern, so no route can
make the waypoint backtrack for minutes on one request path (``/(a+)+$`` against ``/aaa…!``).

Python's `re` stays for the project's own fixed patterns; everything a user writes comes here,
and the controller's schema validates with the same `compile`, so what is accepted is exactly
what the waypoint can run.

Text is matched as UTF-8 bytes (RE2 works on bytes, as Envoy does), so offsets never split a
character and a replacement is built byte for byte.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import re2

from meshcore import errors

# Hints for what RE2 refuses and Python's `re` (hence a user's habit) accepts; only used to
# explain a refusal, never to decide one.
_HINTS = (
    (re.compile(r"\(\?[=!]"), "lookahead"),
    (re.compile(r"\(\?<[=!]"), "lookbehind"),
    (re.compile(r"\\[1-9]|\(\?P="), "backreference"),
)
_BACKSLASH, _ZERO, _NINE = 0x5C, 0x30, 0x39


class RegexError(errors.MeshError, ValueError):
    """A pattern RE2 refuses, or a rewrite it cannot apply; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class Regex:
    """A compiled RE2 pattern; equal to another with the same pattern and case option."""

    pattern: str
    ignore_case: bool = False
    _compiled: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def groups(self) -> int:
        """How many capturing groups the pattern has."""
        return int(self._compiled.groups)

    def matches(self, text: str) -> bool:
        """Whether the pattern matches the whole of `text` (Envoy's semantics)."""
        return self._compiled.fullmatch(_encode(text)) is not None

    def replace_all(self, rewrite: str, text: str) -> str:
        """`text` with every non-overlapping match replaced by `rewrite`, as Envoy's
        ``regex_rewrite`` does (RE2::GlobalReplace): ``\\0`` to ``\\9`` insert a group (empty
        when it did not take part), ``\\\\`` a backslash; an empty match right after the
        previous match is skipped. `rewrite` must have passed `check_rewrite`."""
        data, template = _encode(text), _encode(rewrite)
        out = bytearray()
        pos, last_end, replaced = 0, -1, False
        while pos <= len(data):
            found = self._compiled.search(data, pos)
            if found is None:
                break
            start, end = found.span()
            out += data[pos:start]
            if start == end == last_end:
                step = _char_length(data, pos)
                out += data[pos : pos + step]
                pos += max(step, 1)
                continue
            _expand(template, found, out)
            pos = last_end = end
            replaced = True
        if not replaced:
            return text
        out += data[pos:]
        return bytes(out).decode("utf-8", "surrogatepass")

    def check_rewrite(self, rewrite: str) -> None:
        """Raise `RegexError` unless `replace_all` can apply `rewrite` (RE2::CheckRewriteString)."""
        template = _encode(rewrite)
        highest, i = 0, 0
        while i < len(template):
            if template[i] == _BACKSLASH:
                i += 1
                if i == len(template):
                    raise RegexError("'\\' is not allowed at the end")
                if _ZERO <= template[i] <= _NINE:
                    highest = max(highest, template[i] - _ZERO)
                elif template[i] != _BACKSLASH:
                    raise RegexError("'\\' must be followed by a digit or '\\'")
            i += 1
        if highest > self.groups:
            raise RegexError(
                f"\\{highest} refers to a group the pattern does not have (it has {self.groups})"
            )


def compile(pattern: str, *, ignore_case: bool = False) -> Regex:
    """`pattern` compiled by RE2, or `RegexError` with RE2's reason (and a hint when the
    pattern leans on something only backtracking engines have)."""
    options = re2.Options()
    options.log_errors = False  # the error is raised; RE2 would also print it to stderr
    options.case_sensitive = not ignore_case
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as exc:
        detail = _detail(exc)
        for hint, what in _HINTS:
            if hint.search(pattern):
                raise RegexError(f"{what} is not supported ({detail})") from exc
        raise RegexError(detail) from exc
    return Regex(pattern, ignore_case, compiled)


def escape(text: str) -> str:
    """`text` as a pattern that matches it literally."""
    return str(re2.escape(text))


def _detail(exc: Exception) -> str:
    reason = exc.args[0] if exc.args else exc
    return reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)


def _encode(text: str) -> bytes:
    # surrogatepass: a str that is not valid Unicode still round-trips rather than raising.
    return text.encode("utf-8", "surrogatepass")


def _char_length(data: bytes, pos: int) -> int:
    """Bytes in the UTF-8 character at `pos` (1 for a stray byte; 0 at the end)."""
    if pos >= len(data):
        return 0
    lead = data[pos]
    length = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return min(length, len(data) - pos)


def _expand(template: bytes, found: Any, out: bytearray) -> None:
    i = 0
    while i < len(template):
        byte = template[i]
        if byte == _BACKSLASH and i + 1 < len(template):
            following = template[i + 1]
            if _ZERO <= following <= _NINE:
                out += found.group(following - _ZERO) or b""
            else:
                out.append(following)  # "\\": check_rewrite refuses anything else
            i += 2
            continue
        out.append(byte)
        i += 1
