"""Full attention as the model computes it (`dam_dense`, the `full` side of every comparison): causal, within a
sliding window, scores soft-capped, grouped-query heads read without repeating keys.

SDPA with no mask built where it can (flash / cuDNN kernels, `is_causal` over a fresh cache), a bool mask for
windows and for chunks over a longer cache, float32 matmuls for soft-capping (SDPA has none). A sliding-window
layer reads only the keys its window reaches: in query chunks of `WINDOW_CHUNK` rows in a prefill, the window's
keys alone in a decode step.
"""

from __future__ import annotations

import torch


def rows_causal_mask(first, Sq: int, Sk: int, device, *, window: int | None = None,
                     key_start: int = 0) -> torch.Tensor:
    """bool `[Sq, Sk]`: row `r` (position `first + r`) may see keys `0 .. first + r`, and with
    `window` = W only those with `first + r - j < W`; key column `t` is position `key_start + t`.

    `first` is an int, or a 0-d tensor on `device` (a static cache's fill level minus `Sq`, kept
    on the device so that a CUDA graph can capture the call).
    """
    last = (first + torch.arange(Sq, device=device))[:, None]
    j = (key_start + torch.arange(Sk, device=device))[None, :]
    allowed = j <= last
    return allowed if window is None else allowed & (j > last - window)


def masked_dense_attention(q, k, v, allowed: torch.Tensor, scale: float | None,
                           softcap: float | None = None) -> torch.Tensor:
    """Dense attention in float32 under one bool mask `allowed` `[Sq, Sk]` shared by every head;
    scores soft-capped as `softcap * tanh(s / softcap)` before the mask when `softcap` is set.

    q `[B, H, Sq, D]`, k/v `[B, H_kv, Sk, D]`: the query heads of each kv head are packed as rows of one
    matrix (no repeated keys), so it is two batched matmuls. Returns `[B, H, Sq, D]` in q's dtype.
    """
    B, H, Sq, D = q.shape
    H_kv = k.shape[1]
    G = H // H_kv
    scale = D**-0.5 if scale is None else scale
    s = torch.matmul(q.reshape(B, H_kv, G * Sq, D), k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    p = torch.softmax(s.masked_fill(~allowed.repeat(G, 1), float("-inf")), dim=-1).to(v.dtype)
    return torch.matmul(p, v).reshape(B, H, Sq, D)


def dense_attention(q, k, v, *, start: int, scale: float | None = None, window: int | None = None,
                    softcap: float | None = None, key_start: int = 0) -> torch.Tensor:
    """Full attention of rows `start .. start+Sq-1` over keys `key_start .. start+Sq-1`, as the model computes
    it: causal, within `window`, scores soft-capped by `softcap`. q `[B, H, Sq, D]`, k/v `[B, H_kv, Sk, D]`.

    SDPA with no mask built where it can (flash / cuDNN kernels), a bool mask for windows and chunks over a
    longer cache, float32 matmuls for soft-capping (SDPA has none). Returns `[B, H, Sq, D]`.
    """
    Sq, Sk = q.shape[2], k.shape[2]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = k.shape[1] != q.shape[1]
    if window is not None:
        first = start - window + 1  # the first key position any row reaches
        if first > key_start:  # keys no row reaches (a decode step's window, say) are never read
            k, v = k[:, :, first - key_start:], v[:, :, first - key_start:]
            key_start, Sk = first, Sk - (first - key_start)
        if Sq > WINDOW_CHUNK and Sk > WINDOW_CHUNK + window:
            return _windowed_in_chunks(q, k, v, start=start, scale=scale, window=window, softcap=softcap,
                                       key_start=key_start)
    if softcap is None and window is None and key_start == 0 and start == 0:
        return sdpa(q, k, v, is_causal=Sq > 1, scale=scale, enable_gqa=gqa)
    if softcap is None and window is None and key_start == 0 and Sq == 1:
        return sdpa(q, k, v, scale=scale, enable_gqa=gqa)
    # SDPA's is_causal is aligned top-left; queries here are the last Sq of the positions.
    allowed = rows_causal_mask(start, Sq, Sk, q.device, window=window, key_start=key_start)
    if softcap is not None:
        return masked_dense_attention(q, k, v, allowed, scale, softcap)
    return sdpa(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)


# Query rows per call of a sliding-window layer's dense attention: each chunk reads only the keys its window
# reaches, so the work is S x (chunk + window) instead of S x S, and its mask is chunk x (chunk + window).
WINDOW_CHUNK = 1024


def _windowed_in_chunks(q, k, v, *, start: int, scale: float | None, window: int, softcap: float | None,
                        key_start: int) -> torch.Tensor:
    """`dense_attention` of a sliding-window layer, `WINDOW_CHUNK` query rows at a time over the keys their
    window reaches (the same result: the keys left out are masked for every row of the chunk)."""
    Sq = q.shape[2]
    out = torch.empty_like(q)
    for a in range(0, Sq, WINDOW_CHUNK):
        b = min(Sq, a + WINDOW_CHUNK)
        first = max(key_start, start + a - window + 1)  # the chunk's first reachable key position
        ks, vs = k[:, :, first - key_start: start + b - key_start], v[:, :, first - key_start: start + b - key_start]
        out[:, :, a:b] = dense_attention(q[:, :, a:b], ks, vs, start=start + a, scale=scale, window=window,
                                         softcap=softcap, key_start=first)
    return out
