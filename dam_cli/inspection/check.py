"""`dam inspect --check`: validate a profile without raising, as plain data.

Pure library logic (docs/guides/inspect.md): `check` loads the arrays once and returns a frozen
`CheckResult` listing every error and warning found; nothing is printed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dam_cli.artifact.integrity import (
    MaskCounts,
    causal_diagonal_counts,
    identity_matches,
    pattern_sizes,
    stats_mismatches,
)
from dam_cli.errors import DamError
from dam_cli.inspection.common import JSON_VERSION, json_safe

if TYPE_CHECKING:
    from dam_cli.artifact.profile import ProfileArrays

__all__ = ["CheckResult", "causal_diagonal_counts", "check"]  # causal_diagonal_counts lives in artifact.integrity


@dataclass(frozen=True)
class CheckResult:
    """`--check`: valid iff `errors` is empty. Warnings never fail a check."""

    path: str
    valid: bool
    errors: list[str]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"kind": "dam-check", "json_version": JSON_VERSION, **asdict(self)})


def check(path: str | os.PathLike) -> CheckResult:
    """Validate a profile without raising (`--check`): schema, shapes, internal consistency.

    The stored statistics must match `M` (true density and pattern scores within `STATS_ATOL`: the
    integrity check `load_profile` makes too, `artifact.integrity.stats_mismatches`, here listing every
    mismatch), and, beyond what `load_profile` verifies, R and C must be exactly the patterns whose score
    reaches `mu` (and that have `min_support` cells when the recipe sets it); with `pattern_mass` (patterns
    chosen by mass) R and C may hold patterns below `mu`, never ones under `min_support`. A recipe whose
    `variant` is not "faithful" may leave patterns out on purpose: then a pattern that reaches
    `mu` but is not matched is only a warning. Errors and warnings name the first offending head.
    `M` is read from the file a block of rows at a time: memory stays a few MB whatever the PCL.
    """
    from dam_cli.artifact.profile import load_arrays

    path = os.fspath(path)
    try:
        p = load_arrays(path, true_mask=False)
        counts = _stored_counts(p)
    except DamError as e:
        return CheckResult(path=path, valid=False, errors=[str(e)], warnings=[])
    errors = stats_mismatches(p.stats, counts)  # the loader's integrity check, every mismatch listed
    if not identity_matches(p.meta.model):
        errors.append("dam.model's fields do not hash to its config_sha256: the header was edited or damaged (restore "
                      "a good copy or re-create it with `dam profile`)")
    warnings: list[str] = []
    recipe = p.meta.recipe
    mu = float(recipe["mu"])
    min_support = int(recipe.get("min_support", 1))
    faithful = recipe.get("variant", "faithful") == "faithful"
    by_mass = recipe.get("pattern_mass") is not None  # patterns chosen by mass, not by mu
    size = pattern_sizes(p.pcl)
    for layer in range(p.n_layers):
        for what, count, matched in (("offset", counts.diag[layer].astype(np.float64), p.offsets[layer]),
                                     ("column", counts.col[layer].astype(np.float64), p.columns[layer])):
            # The integer form of masks.match_patterns: count >= size * mu, and enough cells. Patterns chosen by
            # mass (pattern_mass) need not reach mu, but have enough cells too (masks.select_patterns_by_mass).
            long_enough = size >= min_support
            expect = (count >= size * mu) & long_enough
            extra, missing = matched & ~(long_enough if by_mass else expect), expect & ~matched
            if extra.any():
                h, i = (int(v[0]) for v in np.nonzero(extra))
                errors.append(f"layer {layer} head {h} matches {what} {i}, "
                              + (f"whose {int(size[i])} cells are under min_support = {min_support}"
                                 if not long_enough[i] else f"whose score is below mu = {mu}"))
            if missing.any():
                h, i = (int(v[0]) for v in np.nonzero(missing))
                msg = (f"layer {layer} head {h}: {what} {i} reaches mu = {mu} but is not matched"
                       + ("" if faithful else f" ({int(missing.sum())} such in this layer)"))
                (errors if faithful else warnings).append(msg)
    return CheckResult(path=path, valid=not errors, errors=errors, warnings=warnings)


def _stored_counts(p: ProfileArrays) -> MaskCounts:
    """The cell counts of `M`, summed over row blocks read from the file (DamError on a defect found there)."""
    counts = MaskCounts(p.n_layers, p.n_heads, p.pcl)
    for layer in range(p.n_layers):
        for i0, block in p.stored_mask.row_blocks(layer):  # [H, n, L] bool
            counts.add(layer, i0, block)
    return counts
