"""Showing KB text on a terminal: control characters escaped, so a value cannot move the cursor,
recolour the screen, forge an extra output line or reorder what follows it.

Escaped: C0 and C1 controls (NUL, ESC that starts ANSI sequences, CR, newline, DEL, CSI 0x9b, ...),
the line and paragraph separators, the bidirectional overrides ("Trojan Source") and lone surrogates
(undecodable bytes from the command line, which print() cannot even encode). Everything else, accents,
CJK and emoji included, prints as it is. A backslash is left alone, so the display is for reading,
not an exact round trip; use --json for that.
"""

from __future__ import annotations

import json
import re
from typing import Any

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` for one line of terminal output: unsafe characters become \\x1b, \\n, \\u202e, ..."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def json_line(obj: Any) -> str:
    """One line of JSON whose strings are exact (they parse back to the same text) and terminal-safe."""
    # json.dumps already escapes C0 controls; the rest of the unsafe set is escaped the JSON way.
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False))
