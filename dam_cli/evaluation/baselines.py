"""Static-mask baselines as Profile objects, so the DAM backend runs them unchanged.

StreamingLLM (Xiao et al., 2023): every query sees the first `sink` keys and the last `window`
keys (itself included). As a DAM profile with PCL `Ls = max(sink, window)`: the true mask is
that pattern inside `Ls x Ls`, the offsets are `0 .. window-1`, the columns `0 .. sink-1`, so the
Stage-2 extension beyond `Ls` is exactly StreamingLLM at any length.

`matched_window` picks the window whose density at a length equals a target (a DAM profile's
mean density there) to within one key per row, well inside the one-block (64 keys) tolerance.
Pure logic: no model, no files.
"""

from __future__ import annotations

import torch

from dam_cli.artifact.profile import Profile, ProfileMeta
from dam_cli.evaluation.config import DEFAULT_SINK

BLOCK = 64  # the key block the density match is held to (mean keys per row)


def streaming_allowed(length: int, sink: int, window: int) -> torch.Tensor:
    """Keys each query row may attend under StreamingLLM, int64 `[length]` (causal, self included)."""
    i = torch.arange(length, dtype=torch.int64)
    recent = torch.clamp(i + 1, max=window)
    # Sink keys not already inside the window: j < sink and j <= i - window.
    extra = torch.clamp(torch.minimum(torch.full_like(i, sink), i + 1 - window), min=0)
    return recent + extra


def streaming_density(length: int, sink: int, window: int) -> float:
    """Fraction of the `length (length + 1) / 2` causal pairs StreamingLLM allows."""
    return float(streaming_allowed(length, sink, window).sum()) / (length * (length + 1) / 2)


def matched_window(length: int, target_density: float, sink: int = DEFAULT_SINK) -> int:
    """The window in `[1, length]` whose StreamingLLM density at `length` is closest to the target."""
    total = target_density * length * (length + 1) / 2

    def pairs(w: int) -> int:
        return int(streaming_allowed(length, sink, w).sum())

    lo, hi = 1, length  # smallest w with pairs(w) >= total (pairs is nondecreasing in w)
    while lo < hi:
        mid = (lo + hi) // 2
        if pairs(mid) >= total:
            hi = mid
        else:
            lo = mid + 1
    if lo > 1 and abs(pairs(lo - 1) - total) <= abs(pairs(lo) - total):
        return lo - 1
    return lo


def streaming_profile(model_identity: dict, *, sink: int, window: int, length: int | None = None,
                      target_density: float | None = None) -> Profile:
    """StreamingLLM (`sink` + `window`) as a Profile carrying `model_identity`, so `enable_dam` accepts it.

    `length` / `target_density` are only recorded in the recipe (what the window was matched to).
    """
    if sink < 0 or window < 1:
        raise ValueError(f"need sink >= 0 and window >= 1, got sink={sink}, window={window}")
    NL, H = int(model_identity["n_layers"]), int(model_identity["n_heads"])
    Ls = max(sink, window, 1)
    i = torch.arange(Ls)[:, None]
    j = torch.arange(Ls)[None, :]
    head = (j <= i) & (((i - j) < window) | (j < sink))  # [Ls, Ls]
    offsets = torch.arange(Ls) < window
    columns = torch.arange(Ls) < sink
    recipe = {"pcl": Ls, "method": "streaming", "sink": sink, "window": window}
    if length is not None:
        recipe["matched_length"] = int(length)
    if target_density is not None:
        recipe["matched_density"] = float(target_density)
    meta = ProfileMeta(model=dict(model_identity), recipe=recipe,
                       calibration={"token_sha256": "", "samples": 0, "tokens": 0,
                                    "source": "StreamingLLM baseline (no calibration)"})
    # Every head shares one pattern: expand views, no per-head copies before packing.
    return Profile.from_masks(head.expand(NL, H, Ls, Ls), offsets.expand(NL, H, Ls),
                              columns.expand(NL, H, Ls), meta=meta, stats={})


def matched_streaming(profile: Profile, length: int, sink: int = DEFAULT_SINK) -> Profile:
    """StreamingLLM whose density at `length` matches `profile`'s mean Stage-2 density there."""
    target = float(profile.density(length).mean())
    window = matched_window(length, target, sink)
    return streaming_profile(profile.meta.model, sink=sink, window=window, length=length,
                             target_density=target)
