"""The three haystack natures of the suite (prose, code, logs) behind one interface.

A haystack is an unbounded sequence of units (a sentence, a code block, a log line); unit `i` of
`Haystack(kind, seed)` is a pure function of (kind, seed, i), so any token budget can be filled and a
longer prompt of one seed extends a shorter one. `join` lays units and inserted needles out as text.
"""

from __future__ import annotations

from dam_cli.errors import DamUsageError
from dam_cli.evaluation.suite.logs import log_line
from dam_cli.evaluation.suite.prose import PARAGRAPH, prose_sentence
from dam_cli.evaluation.suite.source import code_block

HAYSTACKS = ("prose", "code", "logs")
_UNIT = {"prose": prose_sentence, "code": code_block, "logs": log_line}


def check_haystack(kind: str) -> str:
    """`kind` itself when it names a haystack, else a usage error listing the choices."""
    if kind not in HAYSTACKS:
        raise DamUsageError(f"unknown haystack {kind!r}: choose from {', '.join(HAYSTACKS)}")
    return kind


class Haystack:
    """Units of one (kind, seed) haystack, generated on demand and kept for reuse."""

    def __init__(self, kind: str, seed: int):
        self.kind, self.seed = check_haystack(kind), seed
        self._units: list[str] = []

    def units(self, n: int) -> list[str]:
        """The first `n` units."""
        make = _UNIT[self.kind]
        while len(self._units) < n:
            self._units.append(make(self.seed, len(self._units)))
        return self._units[:n]

    def join(self, pieces: list[str]) -> str:
        """Units and needles as text: prose in paragraphs, code blocks apart by a blank line, one log line each."""
        if self.kind == "code":
            return "\n\n".join(pieces)
        if self.kind == "logs":
            return "\n".join(pieces)
        paragraphs = [" ".join(pieces[i:i + PARAGRAPH]) for i in range(0, len(pieces), PARAGRAPH)]
        return "\n\n".join(paragraphs)


def haystack_text(kind: str, seed: int, n: int) -> str:
    """The first `n` units of a haystack as text, with nothing inserted."""
    h = Haystack(kind, seed)
    return h.join(h.units(n))
