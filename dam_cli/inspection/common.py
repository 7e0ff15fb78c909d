"""Small helpers shared by the summary, comparison and check of `dam inspect`.

JSON cleaning, index ranges, the default --length, option checks against a profile header, each
layer's sliding window and soft-cap as the model identity states them, and the byte popcount table.
Pure: the header is passed in, nothing is read here.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from dam_cli.errors import DamUsageError
from dam_cli.layer_attention import layer_softcap, layer_windows

if TYPE_CHECKING:  # the profile module is imported lazily, inside the entry points
    from dam_cli.artifact.profile import ProfileMeta

JSON_VERSION = 1  # bump when a key of the JSON shape changes meaning or disappears
DEFAULT_LENGTH_FACTOR = 8  # default --length is 8 x PCL (capped at the model's max position)
MAX_LENGTH = 2**40  # densities and pictures cost the same at any --length; this keeps pair counts in int64
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)  # bits set per byte


def ranges(indices: list[int] | np.ndarray) -> str:
    """Sorted indices as compact ranges: `[0, 1, 2, 5, 7, 8]` -> `"0-2, 5, 7-8"`; `"none"` if empty."""
    idx = sorted(int(i) for i in indices)
    if not idx:
        return "none"
    parts: list[str] = []
    start = prev = idx[0]
    for i in idx[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def json_safe(o: Any) -> Any:
    """Make a nested structure JSON-safe: NaN/inf -> None, enums -> values, numpy -> Python."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, Enum):
        return o.value
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def default_length(meta: ProfileMeta) -> int:
    """The --length used when none is given: 8 x PCL, capped at the model's max position (>= PCL)."""
    want = DEFAULT_LENGTH_FACTOR * meta.pcl
    cap = meta.model.get("max_position")
    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= meta.pcl:
        want = min(want, cap)
    return want


def shape_text(meta: ProfileMeta) -> str:
    """`"30 layers x 9 heads, PCL 512"`: how errors and headers name a profile's shape."""
    return f"{meta.n_layers} layers x {meta.n_heads} heads, PCL {meta.pcl}"


def check_selection(meta: ProfileMeta, layer: int | None, head: int | None) -> None:
    """Raise `DamUsageError` unless `--layer`/`--head` name a head of this profile."""
    if head is not None and layer is None:
        raise DamUsageError("--head needs --layer: pass both, e.g. --layer 3 --head 0")
    if layer is not None and not 0 <= layer < meta.n_layers:
        raise DamUsageError(f"--layer {layer} is out of range: this profile has layers 0..{meta.n_layers - 1}")
    if head is not None and not 0 <= head < meta.n_heads:
        raise DamUsageError(f"--head {head} is out of range: this profile has heads 0..{meta.n_heads - 1}")


def check_length(length: int) -> None:
    """Raise `DamUsageError` unless `--length` is from 1 to `MAX_LENGTH`."""
    if length < 1:
        raise DamUsageError(f"--length must be at least 1, got {length}")
    if length > MAX_LENGTH:
        raise DamUsageError(f"--length must be at most {MAX_LENGTH:,} (2^40 tokens, beyond any model's context), "
                            f"got {length:,}")



def attention_text(model: dict[str, Any]) -> str | None:
    """`"sliding window 512 on 15 of 18 layers (global: 5, 11, 17); soft-cap 50.0"`; None for a model
    with neither windows nor a soft-cap (plain causal attention)."""
    windows, cap = layer_windows(model), layer_softcap(model)
    parts = []
    sizes = sorted({w for w in windows if w is not None})
    if sizes:
        n_win = sum(w is not None for w in windows)
        glob = [i for i, w in enumerate(windows) if w is None]
        parts.append(f"sliding window {', '.join(map(str, sizes))} on {n_win} of {len(windows)} layers"
                     + (f" (global: {ranges(glob)})" if glob else ""))
    if cap is not None:
        parts.append(f"soft-cap {cap}")
    return "; ".join(parts) or None
