"""A profile's integrity check: the statistics stored beside the true mask, recounted from the mask.

The format carries no digest. Instead, a profile records per head the density of its true mask `M`
and the score of every diagonal and column (`stats.true_density`, `stats.diag_score`,
`stats.col_score`), all derived from `M` when it is written. Recounting them from the `M` read back
catches damaged mask bytes (one flipped bit moves the score of one diagonal and one column by at
least 1/PCL, far above `STATS_ATOL`) as well as damaged statistics. `load_arrays` runs it whenever
it reads the whole mask (so `load_profile`, i.e. every command); `dam inspect --check` reads the mask
a block of rows at a time and compares with the same `stats_mismatches`, then checks R and C too.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from dam_cli.artifact.triangle import row_blocks, unpack_rows

if TYPE_CHECKING:
    from dam_cli.artifact.profile import ProfileArrays

STATS_ATOL = 1e-6  # float32 stats vs. values recomputed from M (float32 rounding is ~6e-8)


def causal_diagonal_counts(mask: np.ndarray, i0: int = 0) -> np.ndarray:
    """Cells set on each diagonal `r = i - j` by rows `i0 .. i0+n-1` of a causal mask, given as bool
    `[..., n, L]` (the whole `[..., L, L]` mask when `i0` is 0): int64 `[..., L]`.

    Same result as `masks.diagonal_counts` for causal masks (tests check it), in one reduction:
    cell (i, j) sits at flat index `a (L + 1) + (j - a)` of the block (a = i - i0), so viewed `L + 1`
    wide, diagonal `r <= i0` is column `i0 - r` and diagonal `r > i0` column `i0 + L + 1 - r`. Cells
    above the diagonal would share those columns, which is why the mask must be causal. The view is
    a strided one, no copy: rows `0 .. n-2` of it stay inside the block; its last row, which would
    run `n` cells past the end, is added from the block's last row instead.
    """
    b = np.ascontiguousarray(mask).view(np.uint8)
    n, L = b.shape[-2:]
    lead = b.shape[:-2]
    dtype = _count_dtype(n)
    skew = as_strided(b, shape=(*lead, n - 1, L + 1), strides=(*b.strides[:-2], L + 1, 1), writeable=False)
    cols = skew.sum(-2, dtype=dtype) if n > 1 else np.zeros((*lead, L + 1), dtype=dtype)  # [..., L + 1]
    cols[..., :L - n + 1] += b[..., n - 1, n - 1:]  # the last row's cells on and after its diagonal
    out = np.zeros((*lead, L), dtype=np.int64)
    out[..., :i0 + 1] = cols[..., i0::-1]  # r = 0 .. i0
    out[..., i0 + 1:i0 + n] = cols[..., L:L + 1 - n:-1]  # r = i0 + 1 .. i0 + n - 1
    return out


def _count_dtype(n: int) -> type:
    """The narrowest sum type for counts up to `n`: uint16 sums are several times faster than int64."""
    return np.uint16 if n < 1 << 16 else np.int64


class MaskCounts:
    """Cells of `M` per head (`total`, int64 `[N_L, H]`), per diagonal and per column (`diag`, `col`, int64
    `[N_L, H, L]`), summed over blocks of rows given to `add` in any order."""

    def __init__(self, n_layers: int, n_heads: int, pcl: int) -> None:
        self.total = np.zeros((n_layers, n_heads), dtype=np.int64)
        self.diag = np.zeros((n_layers, n_heads, pcl), dtype=np.int64)
        self.col = np.zeros((n_layers, n_heads, pcl), dtype=np.int64)

    def add(self, layer: int, i0: int, block: np.ndarray) -> None:
        """Count rows `i0 .. i0+n-1` of every head of `layer`, given as a causal bool block `[H, n, L]`."""
        c = block.view(np.uint8).sum(-2, dtype=_count_dtype(block.shape[-2]))
        self.col[layer] += c
        self.total[layer] += c.sum(-1, dtype=np.int64)
        self.diag[layer] += causal_diagonal_counts(block, i0)

    @classmethod
    def of_rows(cls, rows: np.ndarray, pcl: int) -> MaskCounts:
        """The counts of a whole row-packed causal mask, uint8 `[N_L, H, L, ceil(L/8)]`, a block of rows at a time."""
        NL, H = rows.shape[:2]
        counts = cls(NL, H, pcl)
        for i0, i1 in row_blocks(pcl, H):
            for layer in range(NL):
                counts.add(layer, i0, unpack_rows(rows[layer, :, i0:i1], pcl))
        return counts


def pattern_sizes(pcl: int) -> np.ndarray:
    """Cells of diagonal `r` (and of column `r`) inside the PCL square, float64 `[L]`."""
    return (pcl - np.arange(pcl)).astype(np.float64)


def stats_mismatches(stats: dict[str, np.ndarray], counts: MaskCounts) -> list[str]:
    """Each stored statistic that does not match the counts of `M` (beyond `STATS_ATOL`), naming its first
    offending head: `stats.true_density` first, then per layer `stats.diag_score` and `stats.col_score`.
    Empty when the profile is intact."""
    NL, H, L = counts.diag.shape
    errors = []
    true_d = counts.total / (L * (L + 1) / 2)
    bad = np.abs(stats["stats.true_density"].astype(np.float64) - true_d) > STATS_ATOL
    if bad.any():
        layer, h = (int(v[0]) for v in np.nonzero(bad))
        errors.append(f"stats.true_density of layer {layer} head {h} does not match its true mask")
    size = pattern_sizes(L)
    for layer in range(NL):
        for name, count in (("diag_score", counts.diag[layer]), ("col_score", counts.col[layer])):
            bad = np.abs(stats[f"stats.{name}"][layer].astype(np.float64) - count / size) > STATS_ATOL
            if bad.any():
                h, i = (int(v[0]) for v in np.nonzero(bad))
                errors.append(f"stats.{name} of layer {layer} head {h} at {i} does not match its true mask")
    return errors


def damaged(p: ProfileArrays, counts: MaskCounts) -> str | None:
    """What a loader says of a profile whose statistics do not match its true mask (`counts`), or None
    when they match: the first mismatch, and the fix."""
    errors = stats_mismatches(p.stats, counts)
    if not errors:
        return None
    n = len(errors) - 1
    more = f" (and {n} more mismatch{'es' if n > 1 else ''})" if n else ""
    return (f"{errors[0]}{more}, so the file is damaged: restore a good copy or re-create it with `dam profile` "
            "(`dam inspect --check` lists every mismatch)")


def identity_sha256(model: dict[str, Any]) -> str:
    """The `config_sha256` of a model identity (`dam_cli.runtime.models.model_identity`): the sha256 of the
    canonical JSON of every field but the name and the hash itself."""
    fields = {k: v for k, v in model.items() if k not in ("config_sha256", "name")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def identity_matches(model: dict[str, Any]) -> bool:
    """Whether a model identity's fields still hash to its `config_sha256` (True when it records none): False is an
    edited or damaged header."""
    sha = model.get("config_sha256")
    return not sha or identity_sha256(model) == sha
