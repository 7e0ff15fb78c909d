"""A tiny counter-based random generator (SplitMix64) keyed by a tuple of values.

Python's `random` only guarantees `random()` across versions; this generator guarantees every
draw, so a suite prompt is the same text on every machine and Python version. Keys go through
SHA-256, never `hash()` (which is salted per process). Pure arithmetic, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")
_MASK = (1 << 64) - 1


def key_state(*parts) -> int:
    """A 64-bit state derived from `parts` (ints and strings) through SHA-256: stable everywhere."""
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


class Rng:
    """SplitMix64 (Steele, Lea and Flood, 2014): `Rng.keyed(*parts)` or `Rng(state)`; all draws are exact."""

    __slots__ = ("state",)

    def __init__(self, state: int = 0):
        self.state = state & _MASK

    @classmethod
    def keyed(cls, *parts) -> Rng:
        return cls(key_state(*parts))

    def next64(self) -> int:
        """The next 64-bit output."""
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """A uniform integer in [0, n), without modulo bias (rejection of the top remainder)."""
        if n <= 0:
            raise ValueError(f"below() needs a positive bound, got {n}")
        limit = (1 << 64) - (1 << 64) % n
        while True:
            x = self.next64()
            if x < limit:
                return x % n

    def randint(self, lo: int, hi: int) -> int:
        """A uniform integer in [lo, hi], both ends included."""
        return lo + self.below(hi - lo + 1)

    def random(self) -> float:
        """A uniform float in [0, 1) with 53 random bits."""
        return (self.next64() >> 11) / float(1 << 53)

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self.below(len(seq))]

    def shuffle(self, items: list) -> None:
        """Fisher-Yates shuffle in place."""
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]

    def sample(self, seq: Sequence[T], k: int) -> list[T]:
        """`k` distinct items of `seq` in random order (partial Fisher-Yates on a copy)."""
        if not 0 <= k <= len(seq):
            raise ValueError(f"cannot sample {k} items from {len(seq)}")
        pool = list(seq)
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]
