"""Text from specs, data and models, made safe to print: control characters shown, never obeyed.

A spec name holding ``\\x1b[2K\\r`` would erase a CI log line and write its own ("all specs passed"); a
NUL or a bidi override in an answer would garble or reorder what a reviewer reads. pytest escapes ids
the same way. Chinese and every other printable character stay as they are.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, and the Unicode format characters that reorder or hide text.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_CONTROLS_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}  # as repr() and pytest's ids show them


def _escaped(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def safe(text: object, keep_newlines: bool = False) -> str:
    """``str(text)`` with control characters as ``\\x1b`` / ``\\u202e`` escapes (newlines kept if asked)."""
    pattern = _CONTROLS_BUT_NEWLINE if keep_newlines else _CONTROLS
    return pattern.sub(_escaped, str(text))
