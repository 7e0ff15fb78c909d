"""Text for people: file contents made safe to print, byte counts made readable."""

from __future__ import annotations

import re

# Characters that would act on a terminal or forge lines: C0/C1 controls, DEL, line and paragraph
# separators, and the bidirectional overrides that reorder what is shown.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def safe_text(value: object) -> str:
    """`str(value)` with every terminal control character escaped (`\\x1b`, `\\n`, `\\u202e`).

    Use it on anything read from a file or the command line before printing it: the result is one
    line and cannot move the cursor, recolour, retitle or clear the terminal.
    """
    return _UNSAFE.sub(_escape, str(value))


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def human_bytes(n: float) -> str:
    """`n` bytes as `812 bytes`, `3.4 MiB`, `12.0 GiB`: small sizes never show as 0.0 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"
