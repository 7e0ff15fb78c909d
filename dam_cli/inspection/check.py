"""`dam inspect --check`: validate a profile without raising, as plain data.

Pure library logic (docs/inspect.md): `check` loads the arrays once and returns a frozen
`CheckResult` listing every error and warning found; nothing is printed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dam_cli.errors import DamError
from dam_cli.inspection.common import JSON_VERSION, json_safe

if TYPE_CHECKING:
    from dam_cli.artifact.profile import ProfileArrays

STATS_ATOL = 1e-6  # float32 stats vs. values recomputed from M (float32 rounding is ~6e-8)


@dataclass(frozen=True)
class CheckResult:
    """`--check`: valid iff `errors` is empty. Warnings never fail a check."""

    path: str
    valid: bool
    errors: list[str]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"kind": "dam-check", "json_version": JSON_VERSION, **asdict(self)})


def causal_diagonal_counts(mask: np.ndarray, i0: int = 0) -> np.ndarray:
    """Cells set on each diagonal `r = i - j` by rows `i0 .. i0+n-1` of a causal mask, given as bool
    `[..., n, L]` (the whole `[..., L, L]` mask when `i0` is 0): int64 `[..., L]`.

    Same result as `masks.diagonal_counts` for causal masks (tests check it), in one reduction:
    cell (i, j) sits at flat index `a (L + 1) + (j - a)` of the block (a = i - i0), so viewed `L + 1`
    wide, diagonal `r <= i0` is column `i0 - r` and diagonal `r > i0` column `i0 + L + 1 - r`. Cells
    above the diagonal would share those columns, which is why the mask must be causal.
    """
    n, L = mask.shape[-2:]
    lead = mask.shape[:-2]
    flat = np.concatenate([mask.reshape(*lead, n * L), np.zeros((*lead, n), dtype=mask.dtype)], axis=-1)
    cols = flat.reshape(*lead, n, L + 1).view(np.uint8).sum(-2, dtype=_count_dtype(n))  # [..., L + 1]
    out = np.zeros((*lead, L), dtype=np.int64)
    out[..., :i0 + 1] = cols[..., i0::-1]  # r = 0 .. i0
    out[..., i0 + 1:i0 + n] = cols[..., L:L + 1 - n:-1]  # r = i0 + 1 .. i0 + n - 1
    return out


def _count_dtype(n: int) -> type:
    """The narrowest sum type for counts up to `n`: uint16 sums are several times faster than int64."""
    return np.uint16 if n < 1 << 16 else np.int64


def check(path: str | os.PathLike) -> CheckResult:
    """Validate a profile without raising (`--check`): schema, shapes, internal consistency.

    Beyond what `load_profile` verifies, the stored statistics must match `M` (true density and
    pattern scores within `STATS_ATOL`) and R and C must be exactly the patterns whose score
    reaches `mu` (and that have `min_support` cells when the recipe sets it). A recipe whose
    `variant` is not "faithful" may leave patterns out on purpose: then a pattern that reaches
    `mu` but is not matched is only a warning. Errors and warnings name the first offending head.
    `M` is read from the file a block of rows at a time: memory stays a few MB whatever the PCL.
    """
    from dam_cli.artifact.profile import load_arrays

    path = os.fspath(path)
    try:
        p = load_arrays(path, true_mask=False)
        counts = [_layer_counts(p, layer) for layer in range(p.n_layers)]
    except DamError as e:
        return CheckResult(path=path, valid=False, errors=[str(e)], warnings=[])
    errors: list[str] = []
    warnings: list[str] = []
    recipe = p.meta.recipe
    mu = float(recipe["mu"])
    min_support = int(recipe.get("min_support", 1))
    faithful = recipe.get("variant", "faithful") == "faithful"
    L = p.pcl
    size = (L - np.arange(L)).astype(np.float64)
    true_d = np.stack([c[0] for c in counts]) / (L * (L + 1) / 2)
    bad = np.abs(p.stats["stats.true_density"].astype(np.float64) - true_d) > STATS_ATOL
    if bad.any():
        layer, h = (int(v[0]) for v in np.nonzero(bad))
        errors.append(f"stats.true_density of layer {layer} head {h} does not match its true mask")
    for layer, (_, diag, col) in enumerate(counts):
        for name, what, count, matched in (("diag_score", "offset", diag.astype(np.float64), p.offsets[layer]),
                                           ("col_score", "column", col.astype(np.float64), p.columns[layer])):
            stored = p.stats[f"stats.{name}"][layer].astype(np.float64)
            bad = np.abs(stored - count / size) > STATS_ATOL
            if bad.any():
                h, i = (int(v[0]) for v in np.nonzero(bad))
                errors.append(f"stats.{name} of layer {layer} head {h} at {i} does not match its true mask")
            # The integer form of masks.match_patterns: count >= size * mu, and enough cells.
            expect = (count >= size * mu) & (size >= min_support)
            extra, missing = matched & ~expect, expect & ~matched
            if extra.any():
                h, i = (int(v[0]) for v in np.nonzero(extra))
                errors.append(f"layer {layer} head {h} matches {what} {i}, whose score is below mu = {mu}")
            if missing.any():
                h, i = (int(v[0]) for v in np.nonzero(missing))
                msg = (f"layer {layer} head {h}: {what} {i} reaches mu = {mu} but is not matched"
                       + ("" if faithful else f" ({int(missing.sum())} such in this layer)"))
                (errors if faithful else warnings).append(msg)
    return CheckResult(path=path, valid=not errors, errors=errors, warnings=warnings)


def _layer_counts(p: ProfileArrays, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells of `M` per head, per diagonal and per column of one layer: int64 `[H]`, `[H, L]`, `[H, L]`,
    summed over row blocks read from the file (DamError on a defect found there)."""
    H, L = p.n_heads, p.pcl
    total = np.zeros(H, dtype=np.int64)
    diag = np.zeros((H, L), dtype=np.int64)
    col = np.zeros((H, L), dtype=np.int64)
    for i0, block in p.stored_mask.row_blocks(layer):  # [H, n, L] bool
        c = block.view(np.uint8).sum(-2, dtype=_count_dtype(block.shape[-2]))
        col += c
        total += c.sum(-1, dtype=np.int64)
        diag += causal_diagonal_counts(block, i0)
    return total, diag, col
