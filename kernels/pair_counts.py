"""Counting the causal pairs a static mask united with a dynamic selection allows, without building `S x S`:
`static_block_counts` (a profile's cells per block pair) and `union_pair_counts` (plus the selected blocks, inside a
sliding window where the layer has one). Pure math for `dam eval`'s density probe; re-exported by `dynamic`."""

from __future__ import annotations

import torch


def static_block_counts(mask_rows, length: int, block: int, chunk: int = 256) -> torch.Tensor:
    """Allowed cells of a static mask in every (query block, key block) pair at `length`: int64
    `[H, nQ, nK]` with `nQ = nK = ceil(length / block)` (blocks aligned as in `select_blocks`).

    `mask_rows(rows, n_keys)` gives bool `[H, len(rows), n_keys]` (e.g. `Profile.mask_rows` of one
    layer). It is called on chunks of whole query blocks (about `chunk` rows), so memory stays
    `H x chunk x length` bools, never `length x length` per head.
    """
    nb = -(-length // block)
    rows_per = block * max(1, chunk // block)
    out = None
    for r0 in range(0, length, rows_per):
        r1 = min(length, r0 + rows_per)
        m = mask_rows(torch.arange(r0, r1), length)  # [H, n, length]
        H = m.shape[0]
        if out is None:
            out = torch.zeros(H, nb, nb, dtype=torch.int64)
        q0, q1 = r0 // block, -(-r1 // block)
        padded = torch.zeros(H, (q1 - q0) * block, nb * block, dtype=torch.bool)
        padded[:, : r1 - r0, :length] = m.cpu()
        per = padded.reshape(H, q1 - q0, block, nb, block).sum(-1, dtype=torch.int32)  # [H, q, block, nK]
        out[:, q0:q1] = per.sum(2, dtype=torch.int64)
    return out


def _window_cells(length: int, block: int, window: int | None) -> torch.Tensor:
    """int64 `[nQ, nK]`: the cells of each (query block, earlier key block) pair inside `window` (`i - j < W`;
    None: every cell). A key block before its query block is always whole; only the last query block may be short."""
    nb = -(-length // block)
    size = torch.clamp(length - torch.arange(nb) * block, max=block)  # positions per block
    if window is None:
        return size[:, None] * size[None, :]
    a = torch.arange(block)
    d = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).clamp(min=0)  # qb - kb
    first_out = (d[..., None] * block + a - window + 1).clamp(0, block)  # keys b < this are beyond the window
    rows = a < size[:, None, None]  # [nQ, 1, block]: the query block's rows
    return ((block - first_out) * rows).sum(-1)


def union_pair_counts(chosen: torch.Tensor, static_blocks: torch.Tensor, length: int, block: int,
                      window: int | None = None) -> torch.Tensor:
    """Causal pairs allowed by the static mask united with a dynamic selection, exactly: int64 `[B, H]`.

    chosen: bool `[B, H, nQ, nK]` from `select_blocks` over all rows `0 .. length-1` (a prefill);
    static_blocks: int64 `[H, nQ, nK]` from `static_block_counts` at the same `length` and
    `block`. The union of `static_mask_rows | dynamic_rows(chosen, ...)` is counted without
    building it: a selected block `(qb, kb)` with `kb < qb` holds only causal pairs, all allowed,
    so it adds its `rows x keys` cells less the static cells already inside it. Selected blocks
    with `kb >= qb` (which `select_blocks` never gives) would not be whole and are refused. In a sliding-window
    layer (`window`; `static_blocks` counted inside it too) a selected block adds only its cells inside the window,
    the ones the kernels compute.
    """
    B, H, nQ, nK = chosen.shape
    nb = -(-length // block)
    if (nQ, nK) != (nb, nb) or static_blocks.shape != (H, nb, nb):
        raise ValueError(f"chosen {tuple(chosen.shape)} and static blocks {tuple(static_blocks.shape)} "
                         f"do not cover {length} positions in blocks of {block}")
    qi = torch.arange(nb)[:, None]
    ki = torch.arange(nb)[None, :]
    ch = chosen.cpu()
    if bool((ch & (ki >= qi)).any()):
        raise ValueError("a selected block is not strictly before its query block")
    cells = _window_cells(length, block, window)  # [nQ, nK]
    added = torch.where(ch, (cells - static_blocks)[None], torch.zeros((), dtype=torch.int64))
    return static_blocks.sum((-1, -2))[None] + added.sum((-1, -2))
