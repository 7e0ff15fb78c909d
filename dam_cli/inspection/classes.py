"""Head classes of `dam inspect`: what a head does, judged from its true mask and matched patterns.

Pure logic, no I/O: `classify_head` applies the rules of docs/guides/inspect.md with the thresholds of
`ClassRules`; `CLASS_ORDER` is the order tables and JSON list the classes in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


class HeadClass(str, Enum):
    """What a head does, judged from `(M, R, C)`; the first matching rule wins (docs/guides/inspect.md).

    Offset 0 and edge patterns (see `ClassRules.edge_cells`) are ignored by every rule.
    """

    FULL = "full"  # a retrieval head kept on full attention (the --retrieval-heads option)
    NEARLY_DENSE = "nearly-dense"  # M keeps at least `dense_at` of the causal pairs
    DIAGONAL_ONLY = "diagonal-only"  # no offset, no column: beyond L a query sees itself only
    SINK_ONLY = "sink-only"  # no offset; every column is a sink (c < sink_width)
    GLOBAL_COLUMNS = "global-columns"  # no offset; some column c >= sink_width
    LOCAL_BAND = "local-band"  # offsets all below local_width (sinks allowed), no global column
    MIXED = "mixed"  # anything else: a band plus global columns, or an offset >= local_width


CLASS_ORDER: tuple[HeadClass, ...] = tuple(HeadClass)


@dataclass(frozen=True)
class ClassRules:
    """Thresholds of the head classes; defaults are documented in docs/guides/inspect.md."""

    sink_width: int = 4  # columns below this are attention sinks (BOS and the first few tokens)
    local_width: int = 64  # offsets below this make a local band; at or above, a long-range diagonal
    dense_at: float = 0.5  # a true density at or above this makes a head nearly dense
    edge_fraction: float = 0.125  # patterns shorter than this share of L are edge patterns

    def edge_cells(self, L: int) -> int:
        """Patterns with fewer cells than this are edge patterns: `max(2, floor(edge_fraction * L))`.

        Diagonal `r` and column `c` hold `L - r` and `L - c` cells. The last few of each sit in
        the corners of `M`, where the sink column and the local band alone reach `mu`, so they
        match whatever the head does (e.g. offset 511 and columns 500-511 at L = 512). They are
        still part of R and C and still extend beyond L; the classes just do not read them.
        """
        return max(2, int(self.edge_fraction * L))


def classify_head(true_density: float, offsets: np.ndarray, columns: np.ndarray,
                  rules: ClassRules = ClassRules(), full: bool = False) -> HeadClass:
    """The class of one head from its true density and bool `[L]` offsets / columns.

    Offset 0 is ignored (the diagonal guard allows it anyway), and so are edge patterns.
    A head the profile keeps on full attention is `full`, whatever its masks.
    """
    if full:
        return HeadClass.FULL
    L = offsets.shape[-1]
    last = L - rules.edge_cells(L)  # pattern x holds L - x cells: x > last is an edge pattern
    r = np.flatnonzero(offsets)
    r = r[(r > 0) & (r <= last)]
    c = np.flatnonzero(columns)
    c = c[c <= last]
    has_global = bool((c >= rules.sink_width).any())
    if true_density >= rules.dense_at:
        return HeadClass.NEARLY_DENSE
    if r.size == 0:
        if c.size == 0:
            return HeadClass.DIAGONAL_ONLY
        return HeadClass.GLOBAL_COLUMNS if has_global else HeadClass.SINK_ONLY
    if int(r.max()) < rules.local_width and not has_global:
        return HeadClass.LOCAL_BAND
    return HeadClass.MIXED
