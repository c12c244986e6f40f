"""Text from specs, data and models, made safe to print: control characters shown, never obeyed.

A spec name holding ``\\x1b[2K\\r`` would erase a CI log line and write its own ("all specs passed"); a
NUL or a bidi override in an answer would garble or reorder what a reviewer reads. pytest escapes ids
the same way. Chinese and every other printable character stay as they are.
"""

from __future__ import annotations

import html
import re

# C0 controls, DEL, C1 controls, the line and paragraph separators, and the Unicode format characters
# that reorder or hide text.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
_CONTROLS_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}  # as repr() and pytest's ids show them


def _escaped(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def safe(text: object, keep_newlines: bool = False) -> str:
    """``str(text)`` with control characters as ``\\x1b`` / ``\\u202e`` escapes (newlines kept if asked)."""
    pattern = _CONTROLS_BUT_NEWLINE if keep_newlines else _CONTROLS
    return pattern.sub(_escaped, str(text))


#: What turns text into markup inside a line (emphasis, code, links, table cells, strikethrough).
_MARKUP = re.compile(r"([\\`*_\[\]|~])")


#: What GitHub turns into a link or a notification by itself: URLs, www., @mentions, #issue references.
#: The "#" rule first: the entities the others write hold "#" and a digit themselves.
_AUTOLINKS = ((re.compile(r"#(?=\d)"), "&#35;"), (re.compile(r"@(?=\w)"), "&#64;"),
              (re.compile(r":(?=//)"), "&#58;"), (re.compile(r"(?i)\bwww\."), "www&#46;"))


def md_text(value: object) -> str:
    """Text as Markdown shows it literally: one line, HTML and Markdown markup escaped, and nothing GitHub
    would turn into a link or a notification (a spec named ``@team https://x`` pings no one, links nowhere)."""
    text = _MARKUP.sub(r"\\\1", html.escape(safe(value), quote=False))
    for pattern, entity in _AUTOLINKS:
        text = pattern.sub(entity, text)
    return text


def md_code(text: str) -> str:
    """A fenced block that no backtick run inside can close (a fence longer than any in the text)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{safe(text, keep_newlines=True)}\n{fence}"
