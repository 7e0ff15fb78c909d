"""JSON objects whose keys are each given once: Python's reader keeps the last of two silently, so a profile's
header or a JSON-lines prompt could say one thing and mean another. `json.loads(text, object_pairs_hook=unique_keys)`
raises `DuplicateKey` (a ValueError) naming the key instead."""

from __future__ import annotations

from typing import Any


class DuplicateKey(ValueError):
    """A key given twice in one JSON object; `str(e)` and `e.key` name it."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; a key given twice raises `DuplicateKey`."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return out
