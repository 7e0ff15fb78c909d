"""`dam inspect --check`: validate a profile without raising, as plain data.

Pure library logic (docs/inspect.md): `check` loads the arrays once and returns a frozen
`CheckResult` listing every error and warning found; nothing is printed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dam_cli.errors import DamError
from dam_cli.inspection.common import JSON_VERSION, POPCOUNT, json_safe

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


def causal_diagonal_counts(mask: np.ndarray) -> np.ndarray:
    """Cells set on each diagonal `r = i - j` of causal bool `[..., L, L]` masks: int64 `[..., L]`.

    Same result as `masks.diagonal_counts` for causal masks (tests check it), in one reduction:
    cell (i, j) sits at flat index `i (L + 1) + (j - i)`, so viewed `L + 1` wide, diagonal
    `r > 0` is column `L + 1 - r` (row i - 1) and diagonal 0 is column 0. Upper diagonals would
    share those columns, which is why the mask must be causal.
    """
    L = mask.shape[-1]
    lead = mask.shape[:-2]
    flat = np.concatenate([mask.reshape(*lead, L * L), np.zeros((*lead, L), dtype=mask.dtype)], axis=-1)
    cols = flat.reshape(*lead, L, L + 1).sum(-2, dtype=np.int64)  # [..., L + 1]
    return np.concatenate([cols[..., :1], cols[..., L:1:-1]], axis=-1)  # r = 0, then r = 1 .. L-1


def check(path: str | os.PathLike) -> CheckResult:
    """Validate a profile without raising (`--check`): schema, shapes, internal consistency.

    Beyond what `load_profile` verifies, the stored statistics must match `M` (true density and
    pattern scores within `STATS_ATOL`) and R and C must be exactly the patterns whose score
    reaches `mu` (and that have `min_support` cells when the recipe sets it). A recipe whose
    `variant` is not "faithful" may leave patterns out on purpose: then a pattern that reaches
    `mu` but is not matched is only a warning. Errors and warnings name the first offending head.
    """
    from dam_cli.artifact.profile import load_arrays

    path = os.fspath(path)
    try:
        p = load_arrays(path)
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
    true_d = POPCOUNT[p.true_mask_packed].sum((-1, -2), dtype=np.int64) / (L * (L + 1) / 2)
    bad = np.abs(p.stats["stats.true_density"].astype(np.float64) - true_d) > STATS_ATOL
    if bad.any():
        layer, h = (int(v[0]) for v in np.nonzero(bad))
        errors.append(f"stats.true_density of layer {layer} head {h} does not match its true mask")
    for layer in range(p.n_layers):
        # [H, L, L], causal (checked by the loader)
        tm = np.unpackbits(p.true_mask_packed[layer], axis=-1, count=L, bitorder="little").astype(np.bool_)
        for name, what, count, matched in (
                ("diag_score", "offset", causal_diagonal_counts(tm).astype(np.float64), p.offsets[layer]),
                ("col_score", "column", tm.sum(-2, dtype=np.int64).astype(np.float64), p.columns[layer])):
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
