"""Profiling shared by several processes, with the same bytes as one process.

Rank r of N captures calibration windows r, r + N, ... (and scores needle prompts r, r + N, ...).
Stage 1 of a layer needs that layer's attention sums over every window, and a floating-point sum
depends on its order. So the queries and keys captured for layer l go to the rank that owns it
(l mod N), which adds the windows up in the one-process order and derives the layer's masks;
rank 0 then receives every layer's masks in layer order (and needle scores by prompt, summed in
prompt order). Each layer is computed by the same code on the same inputs as in one process, so
the profile is byte-identical for any N (tests/profiling/test_sharded.py).

What moves: each window's q and k once (float32 `[H, L, D]` and `[H_kv, L, D]` per layer), and
each layer's packed masks. Nothing here computes; it only decides who does what and moves it.
"""

from __future__ import annotations

from typing import Any

from dam_cli.distributed import Ranks


def owned_windows(n: int, ranks: Ranks) -> list[int]:
    """Indices of the windows (or prompts) among `n` that this rank runs: r, r + N, ..."""
    return list(range(ranks.rank, n, ranks.world))


def owner(layer: int, world: int) -> int:
    return layer % world


def owned_layers(n_layers: int, ranks: Ranks) -> list[int]:
    """The layers this rank derives: r, r + N, ..."""
    return [layer for layer in range(n_layers) if owner(layer, ranks.world) == ranks.rank]


def exchange_qk(ranks: Ranks, cap, indices: list[int], n_layers: int) -> dict[int, tuple]:
    """Send each layer's captured q and k to the layer's owner; return, for the layers this rank owns,
    (q list, k list, scale, window, softcap) with the windows in their one-process order.

    `cap` is this rank's `capture.Capture` of the windows `indices`; its lists are emptied as they go.
    """
    mine: dict[int, tuple] = {}
    for layer in range(n_layers):
        payload = (indices, cap.q[layer], cap.k[layer],
                   (cap.scaling[layer], cap.windows[layer], cap.softcaps[layer]) if indices else None)
        cap.q[layer] = cap.k[layer] = []
        got = ranks.gather(payload, dst=owner(layer, ranks.world))
        if got is None:
            continue
        by_index: dict[int, tuple[Any, Any]] = {}
        attn = None
        for idx, qs, ks, a in got:
            by_index.update({i: (q, k) for i, q, k in zip(idx, qs, ks, strict=True)})
            attn = attn or a
        order = sorted(by_index)
        mine[layer] = ([by_index[i][0] for i in order], [by_index[i][1] for i in order], *attn)
    return mine


def gather_layers(ranks: Ranks, mine: list, n_layers: int):
    """On rank 0, yield every layer's derived masks (`run.LayerMasks`) in layer order; elsewhere, yield nothing.

    One exchange per layer, so rank 0 holds one other rank's layer at a time.
    """
    by_layer = {m.layer: m for m in mine}
    for layer in range(n_layers):
        o = owner(layer, ranks.world)
        if o == 0:
            if ranks.is_main:
                yield by_layer.pop(layer)
            continue
        got = ranks.gather(by_layer.pop(layer, None), dst=0)
        if got is not None:
            yield got[o]


def gather_by_index(ranks: Ranks, scores: dict[int, Any]) -> dict[int, Any] | None:
    """Merge every rank's `{index: value}` on rank 0 (None elsewhere)."""
    got = ranks.gather(scores, dst=0)
    if got is None:
        return None
    merged: dict[int, Any] = {}
    for part in got:
        merged.update(part)
    return merged
