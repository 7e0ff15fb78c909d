"""The Stage-2 rule of DAM (../shared/dam-spec.md), row by row: which keys a query row may see.

Inside the profiled length `L` a row reads its true mask `M`; beyond it, the matched diagonals
`R` (key `i - r`) and columns `C` (key `c`). Always causal, with the diagonal guard (`j == i`).
The one implementation: `dam_cli.masks.stage2_rows` and the block layouts (`layout.py`) use it.
Pure torch, no I/O.
"""

from __future__ import annotations

import math

import torch


def stage2_rows(
    true_mask: torch.Tensor,  # [..., L, L] bool
    offsets: torch.Tensor,  # [..., L] bool
    columns: torch.Tensor,  # [..., L] bool
    rows: torch.Tensor,  # [n] int64 absolute query positions
    n_keys: int,
    full: torch.Tensor | None = None,  # [...] bool: heads kept on full attention (option)
    key_start: int = 0,
) -> torch.Tensor:
    """Stage-2 element mask for the given query rows over keys `key_start .. key_start+n_keys-1`:
    bool `[..., n, n_keys]`.

    Inside `L x L` the true mask, elsewhere matched diagonals and columns; always causal; the
    diagonal guard keeps `j == i`. Heads flagged in `full` (the retrieval-heads option) allow every
    causal pair. Memory is `n x n_keys`, so callers chunk long sequences (and may ask for a key
    range only: the reference reads just the keys a row beyond L can reach).
    """
    L = true_mask.shape[-1]
    lead = true_mask.shape[:-2]
    G = math.prod(lead)
    rows = rows.to(torch.int64)
    n = rows.shape[0]
    k0 = int(key_start)
    out = torch.zeros(G, n, n_keys, dtype=torch.bool)
    tm = true_mask.reshape(G, L, L)
    inside = (rows < L).nonzero().flatten()
    K = max(0, min(n_keys, L - k0))
    if inside.numel() and K:  # rows below L copy their row of M (keys < L; causal by construction)
        r_in = rows[inside]
        j = k0 + torch.arange(K)
        out[:, inside, :K] = tm[:, r_in, k0:k0 + K] & (j[None, :] <= r_in[:, None])
    beyond = (rows >= L).nonzero().flatten()
    if beyond.numel():
        # Rows beyond L: scatter the few matched offsets (key i - r) and columns (key c < L <= i).
        i = rows[beyond]
        for pats, is_offset in ((offsets, True), (columns, False)):
            pairs = pats.reshape(G, L).nonzero()  # [P, 2]: head, offset or column
            if not pairs.numel():
                continue
            g, x = pairs[:, :1], pairs[:, 1:]
            t = ((i[None, :] - x) if is_offset else x.expand(-1, i.shape[0])) - k0
            ok = (t >= 0) & (t < n_keys)
            out[g.expand_as(t)[ok], beyond[None, :].expand_as(t)[ok], t[ok]] = True
    if full is not None and bool(full.any()):
        causal = (k0 + torch.arange(n_keys))[None, :] <= rows[:, None]
        out |= full.reshape(G, 1, 1) & causal
    t = rows - k0
    guard = ((t >= 0) & (t < n_keys)).nonzero().flatten()
    out[:, guard, t[guard]] = True
    return out.reshape(*lead, n, n_keys)
