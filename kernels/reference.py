"""PyTorch reference of DAM sparse attention: exact masked softmax in float32.

Same signature as the Triton launchers. Chunked over queries so it also serves long sequences
on the CPU: memory is `B x H x chunk x keys` floats, never `Sq x Sk` for the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# mask_rows(rows [n] int64, n_keys[, key_start]) -> bool [H, n, n_keys] (the Stage-2 rows of one
# layer over keys key_start .. key_start+n_keys-1), or [B, H, n, n_keys] when the mask depends on
# the input (the dynamic option). key_start is passed only when it is not 0 (a cut key range).
MaskRows = Callable[[torch.Tensor, int], torch.Tensor]


def _key_ranges(r0: int, r1: int, k_lo: int, k_hi: int, key_span: int | None,
                window: int | None) -> list[tuple[int, int]]:
    """Absolute key ranges `[a, b)` that rows `r0 .. r1-1` may reach: the keys held
    (`[k_lo, k_hi)`), cut to the window of the first row and, past `key_span` = L, to keys
    below L and the last L positions. Exact: every key left out has probability zero."""
    a, b = k_lo, k_hi
    if window is not None:
        a, b = max(a, r0 - window + 1), min(b, r1)
    lo = r0 - key_span + 1 if key_span is not None else 0
    if key_span is not None and r0 >= key_span and lo > key_span:
        parts = [(a, min(b, key_span)), (max(a, lo), b)]
    else:
        parts = [(a, b)]
    return [(x, y) for x, y in parts if y > x]


def reference_attention(
    q: torch.Tensor,  # [B, H, Sq, D]
    k: torch.Tensor,  # [B, H_kv, Sk, D]
    v: torch.Tensor,  # [B, H_kv, Sk, D]
    mask_rows: MaskRows,
    *,
    start: int = 0,
    scale: float | None = None,
    chunk: int = 256,
    key_span: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
    key_start: int = 0,
) -> torch.Tensor:
    """Masked softmax attention for query rows `start .. start+Sq-1` over keys at absolute
    positions `key_start .. key_start+Sk-1` (`k[:, :, t]` is position `key_start + t`).

    Grouped-query heads read their kv head through a reshape, never a repeated copy. Returns
    `[B, H, Sq, D]` in q's dtype; accumulation is float32.

    `key_span` = L promises that a row `i >= L` only attends keys below `L` or above `i - L`
    (true of every static DAM mask without full heads): such chunks then read only those keys,
    which is exact (the others would get zero probability) and makes long sequences cheap.
    `window` = W (a sliding-window layer) keeps key `j` for row `i` only if `i - j < W` and
    `j <= i`, on top of the mask (transformers' `sliding_window_overlay`). `softcap` = c maps
    the scaled scores to `c * tanh(s / c)` before the mask and the softmax (Gemma 2).
    `key_start > 0` (a cache that dropped keys) needs a window that no row reaches past.
    """
    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = D**-0.5 if scale is None else scale
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if key_start < 0 or key_start > start:
        raise ValueError(f"key_start {key_start} must lie in 0 .. start ({start})")
    if key_start > 0 and (window is None or start - window + 1 < key_start):
        raise ValueError(f"keys before position {key_start} are missing but row {start} may attend them "
                         f"(window {window}): pass the whole cache")
    out = torch.empty_like(q)
    kf = k.float().unsqueeze(2)  # [B, H_kv, 1, Sk, D]
    vf = v.float().unsqueeze(2)
    for s0 in range(0, Sq, chunk):
        s1 = min(Sq, s0 + chunk)
        rows = torch.arange(start + s0, start + s1)
        ranges = _key_ranges(start + s0, start + s1, key_start, key_start + Sk, key_span, window)
        if ranges == [(key_start, key_start + Sk)]:
            kc, vc = kf, vf
        elif len(ranges) == 1:  # one slice: a view, no copy
            a, b = ranges[0]
            kc, vc = kf.narrow(3, a - key_start, b - a), vf.narrow(3, a - key_start, b - a)
        else:
            idx = torch.cat([torch.arange(a, b) for a, b in ranges]).to(q.device) - key_start
            kc, vc = kf.index_select(3, idx), vf.index_select(3, idx)
        # [H, n, keys], or [B, H, n, keys] when per input
        parts = [mask_rows(rows, b - a, a) if a else mask_rows(rows, b - a) for a, b in ranges]
        allowed = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(q.device)
        if window is not None:
            j = torch.cat([torch.arange(a, b) for a, b in ranges])
            band = (j[None, :] > rows[:, None] - window) & (j[None, :] <= rows[:, None])
            allowed = allowed & band.to(q.device)
        n_keys = kc.shape[3]
        qc = q[:, :, s0:s1].float().reshape(B, H_kv, G, s1 - s0, D)
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, H_kv, G, n, keys]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        lead = allowed.shape[0] if allowed.dim() == 4 else 1
        scores = scores.masked_fill(~allowed.reshape(lead, H_kv, G, s1 - s0, n_keys), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.matmul(probs, vc)  # [B, H_kv, G, n, D]
        out[:, :, s0:s1] = o.reshape(B, H, s1 - s0, D).to(q.dtype)
    return out
