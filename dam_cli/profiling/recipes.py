"""Named recipes for `dam profile`: the paper's, and the recommended one (the default).

A recipe is a set of `ProfileConfig` field values plus the run-time options a profile made with
it recommends (`ProfileMeta.runtime`): `dam generate`, `dam eval` and `enable_dam` use those
unless the user passes their own. `paper` changes nothing: it is the spec's method exactly
(docs/reference/spec-decisions.md), and its profile carries no run-time options.
"""

from __future__ import annotations

from typing import Any

PAPER = "paper"
RECOMMENDED = "recommended"
NAMES = (RECOMMENDED, PAPER)

# ProfileConfig fields each recipe sets (beyond-paper options; the paper's values are the dataclass defaults).
RECIPE_OPTIONS: dict[str, dict[str, Any]] = {
    PAPER: {},
    RECOMMENDED: {"pattern_mass": 0.9, "min_support": 64, "retrieval_heads": 16, "retrieval_by": "needle"},
}

# The run-time options a profile of each recipe carries: the dynamic part's settings
# (`dam_kernels.selection.DynamicSelection` fields). docs/results/accuracy.md says how they were chosen.
RECIPE_RUNTIME: dict[str, dict[str, Any] | None] = {
    PAPER: None,
    RECOMMENDED: {"dynamic": {"topk": 32, "block": 64, "tail_topk": 32, "score": "antisum", "tail_mass": 0.9}},
}


RUNTIME_CHOICES = ("recipe", RECOMMENDED, "none")  # what `dam profile --runtime` records


def recipe_fields(name: str, overrides: dict[str, Any], runtime: str = "recipe") -> dict[str, Any]:
    """ProfileConfig keyword arguments for recipe `name`, with the user's explicit options on top.

    `overrides` holds only options the user gave (None values are dropped). With `runtime` "recipe"
    the run-time options are the recipe's as long as the user changed none of its mask options;
    otherwise none are recorded, since they were chosen for the recipe's masks only. "recommended"
    records the recommended recipe's run-time options whatever the masks (the user vouches for them,
    e.g. after `dam eval` on this model); "none" records none.
    """
    from dam_cli.errors import DamUsageError

    if name not in NAMES:
        raise DamUsageError(f"--recipe must be one of {', '.join(NAMES)}, got {name!r}")
    if runtime not in RUNTIME_CHOICES:
        raise DamUsageError(f"--runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {runtime!r}")
    given = {k: v for k, v in overrides.items() if v is not None}
    fields = {**RECIPE_OPTIONS[name], **given}
    if fields.get("retrieval_heads") == 0 and "retrieval_by" not in given:
        fields.pop("retrieval_by", None)  # no retrieval heads: nothing to choose them by
    changed = any(k in RECIPE_OPTIONS[name] and given[k] != RECIPE_OPTIONS[name][k] for k in given) or any(
        k in MASK_OPTIONS and k not in RECIPE_OPTIONS[name] for k in given)
    fields["runtime"] = {"recipe": None if changed else RECIPE_RUNTIME[name], RECOMMENDED: RECIPE_RUNTIME[RECOMMENDED],
                         "none": None}[runtime]
    return fields


# Options that change the masks (and so void a recipe's run-time recommendation when changed).
MASK_OPTIONS = ("pattern_mass", "min_support", "retrieval_heads", "retrieval_by", "local_window", "tau", "lam",
                "mu", "pcl", "needle_length", "needle_samples")
