"""PyTorch reference of DAM sparse attention: exact masked softmax in float32.

Same signature as the Triton launchers. Chunked over queries so it also serves long sequences
on the CPU: memory is `B x H x chunk x Sk` floats, never `Sq x Sk` for the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# mask_rows(rows [n] int64, n_keys[, key_start]) -> bool [H, n, n_keys] (the Stage-2 rows of one
# layer over keys key_start .. key_start+n_keys-1), or [B, H, n, n_keys] when the mask depends on
# the input (the dynamic option). key_start is passed only with key_span.
MaskRows = Callable[[torch.Tensor, int], torch.Tensor]


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
) -> torch.Tensor:
    """Masked softmax attention for query rows `start .. start+Sq-1` over keys `0 .. Sk-1`.

    Grouped-query heads read their kv head through a reshape, never a repeated copy. Returns
    `[B, H, Sq, D]` in q's dtype; accumulation is float32.

    `key_span` = L promises that a row `i >= L` only attends keys below `L` or above `i - L`
    (true of every static DAM mask without full heads): such chunks then read only those keys,
    which is exact (the others would get zero probability) and makes long sequences cheap.
    """
    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = D**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    kf = k.float().unsqueeze(2)  # [B, H_kv, 1, Sk, D]
    vf = v.float().unsqueeze(2)
    for s0 in range(0, Sq, chunk):
        s1 = min(Sq, s0 + chunk)
        rows = torch.arange(start + s0, start + s1)
        kc, vc = kf, vf
        lo = start + s0 - key_span + 1 if key_span is not None else 0
        if key_span is not None and start + s0 >= key_span and lo > key_span:
            # Rows beyond L reach keys below L and the last L positions only: skip the middle,
            # and build the mask rows of those keys only.
            idx = torch.cat([torch.arange(key_span), torch.arange(lo, Sk)]).to(q.device)
            kc, vc = kf.index_select(3, idx), vf.index_select(3, idx)
            allowed = torch.cat([mask_rows(rows, key_span, 0), mask_rows(rows, Sk - lo, lo)], dim=-1).to(q.device)
        else:
            allowed = mask_rows(rows, Sk).to(q.device)  # [H, n, Sk], or [B, H, n, Sk] when per input
        n_keys = kc.shape[3]
        qc = q[:, :, s0:s1].float().reshape(B, H_kv, G, s1 - s0, D)
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, H_kv, G, n, keys]
        lead = allowed.shape[0] if allowed.dim() == 4 else 1
        scores = scores.masked_fill(~allowed.reshape(lead, H_kv, G, s1 - s0, n_keys), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.matmul(probs, vc)  # [B, H_kv, G, n, D]
        out[:, :, s0:s1] = o.reshape(B, H, s1 - s0, D).to(q.dtype)
    return out
