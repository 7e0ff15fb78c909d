"""Downsampled pictures of masks for `dam inspect`: a head's true and Stage-2 masks, every head's tile.

Pure numpy (torch only for `stage2_rows`, the one implementation of the Stage-2 rule), no I/O. The
true mask is read a block of rows at a time from its packed bits, and a Stage-2 row only over the
keys it can reach, so memory stays a few MB whatever the PCL and the --length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dam_cli.artifact.triangle import row_blocks, unpack_rows
from dam_cli.inspection.common import layer_windows

if TYPE_CHECKING:  # torch and the profile module are imported lazily, inside the entry points
    from dam_cli.artifact.profile import Profile

ROW_CHUNK_CELLS = 1 << 21  # cells of one [rows, keys] Stage-2 temporary (2 MB of bools)


@dataclass(frozen=True)
class HeadPicture:
    """Downsampled pictures of one head: each cell is the fraction of its pairs that are allowed."""

    layer: int
    head: int
    length: int
    true_mask: np.ndarray  # float64 [g, g] over the L x L true mask
    stage2: np.ndarray  # float64 [g2, g2] over the S x S Stage-2 mask
    stage2_exact: bool  # False when rows were sampled (long S): see head_picture()

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "head": self.head, "length": self.length,
                "true_mask": np.round(self.true_mask, 4).tolist(),
                "stage2": np.round(self.stage2, 4).tolist(), "stage2_exact": self.stage2_exact}


def bins(n: int, g: int) -> np.ndarray:
    """Start indices of `g` near-equal bins over `[0, n)` (g <= n)."""
    return (np.arange(g, dtype=np.int64) * n) // g


def bin_sums(x: np.ndarray, k0: int, edges: np.ndarray, g_axis_len: int) -> np.ndarray:
    """Sums of int `x [..., W]` (positions `k0 .. k0+W-1` of a range cut at `edges`) per bin: `[..., g]`."""
    W = x.shape[-1]
    out = np.zeros((*x.shape[:-1], g_axis_len), dtype=np.int64)
    lo = int(np.searchsorted(edges, k0, side="right")) - 1
    hi = int(np.searchsorted(edges, k0 + W - 1, side="right")) - 1
    starts = np.concatenate([[0], edges[lo + 1:hi + 1] - k0])
    out[..., lo:hi + 1] = np.add.reduceat(x, starts, axis=-1, dtype=np.int64)
    return out


def pool_packed(packed: np.ndarray, L: int, g: int) -> np.ndarray:
    """Row-packed masks uint8 `[..., L, ceil(L/8)]` downsampled to float64 `[..., g', g']` (g' = min(g, L)):
    the allowed fraction of each cell, read a block of rows at a time."""
    g = max(1, min(g, L))
    edges = bins(L, g)
    size = np.diff(np.append(edges, L))
    lead = packed.shape[:-2]
    acc = np.zeros((*lead, g, g), dtype=np.int64)
    for i0, i1 in row_blocks(L, int(np.prod(lead, dtype=np.int64)) or 1):
        cols = bin_sums(unpack_rows(packed[..., i0:i1, :], L).view(np.uint8), 0, edges, g)  # [..., n, g]
        acc += np.moveaxis(bin_sums(np.moveaxis(cols, -1, -2), i0, edges, g), -1, -2)
    return acc / (size[:, None] * size[None, :])


def pool(mask: np.ndarray, g: int) -> np.ndarray:
    """Downsample bool `[..., n, n]` to float64 `[..., g', g']` (g' = min(g, n)): allowed fraction per cell."""
    return pool_packed(np.packbits(mask, axis=-1, bitorder="little"), mask.shape[-1], g)


def _stage2_cells(p: Profile, layer: int, head: int, rows: np.ndarray, S: int, edges: np.ndarray,
                  window: int | None = None) -> np.ndarray:
    """Allowed keys of each Stage-2 row in `rows`, per key bin: int64 `[len(rows), g]`; with a sliding
    `window` W only keys `j > i - W` count (what the layer really attends to).

    A head on full attention allows keys `0 .. i`. Otherwise a row reaches only keys below L (its
    row of M, or the columns) and, beyond L, keys `i - L + 1 .. i` (offsets below L, the guard):
    `stage2_rows` is asked for those two windows only.
    """
    import torch

    from dam_cli import masks

    g = edges.size
    size = np.diff(np.append(edges, S))
    first = np.maximum(0, rows - window + 1) if window is not None else np.zeros_like(rows)  # first key seen
    if p.full_heads is not None and bool(p.full_heads[layer, head]):
        hi = np.minimum(rows[:, None] + 1, (edges + size)[None, :])
        return np.clip(hi - np.maximum(first[:, None], edges[None, :]), 0, None)
    L = p.pcl
    tm = torch.from_numpy(unpack_rows(p.true_mask_packed[layer, head].numpy(), L))  # [L, L], one head only
    R, C = p.offsets[layer, head], p.columns[layer, head]
    out = np.zeros((rows.size, g), dtype=np.int64)
    K = min(L, S)
    chunk = max(1, ROW_CHUNK_CELLS // K)
    for k in range(0, rows.size, chunk):  # keys 0 .. K-1 of every row
        m = masks.stage2_rows(tm, R, C, torch.from_numpy(rows[k:k + chunk]), K).numpy()
        m &= np.arange(K)[None, :] >= first[k:k + chunk, None]
        out[k:k + chunk] += bin_sums(m.view(np.uint8), 0, edges, g)
    for n, i in enumerate(rows.tolist()):  # rows beyond L: keys max(L, i - L + 1, first) .. i
        k0 = max(L, i - L + 1, int(first[n]))
        if i >= L and i + 1 > k0:
            m = masks.stage2_rows(tm, R, C, torch.tensor([i]), i + 1 - k0, key_start=k0).numpy()
            out[n] += bin_sums(m[0].view(np.uint8), k0, edges, g)
    return out


def head_picture(p: Profile, layer: int, head: int, length: int, grid: int,
                 rows_per_cell: int = 8) -> HeadPicture:
    """Pictures of one head's true mask and Stage-2 mask at `length` (within the layer's sliding window,
    when the model identity states one), at most `grid` cells a side.

    The Stage-2 picture reads `rows_per_cell` evenly spaced query rows of each cell row (all of
    them when a cell is at most that tall, then it is exact); its rows come from
    `masks.stage2_rows`, so the picture shows exactly the mask the kernels apply.
    """
    true_pic = pool_packed(p.true_mask_packed[layer, head].numpy(), p.pcl, grid)
    S = length
    g = max(1, min(grid, S))
    edges = bins(S, g)
    size = np.diff(np.append(edges, S))
    exact = bool(size.max() <= rows_per_cell)
    rows_of = [np.unique(np.linspace(a, a + n - 1, min(n, rows_per_cell)).round().astype(np.int64))
               for a, n in zip(edges, size)]
    window = layer_windows(p.meta.model)[layer]
    window = None if window is None else min(window, S)  # a window of S or more cuts nothing
    pooled = _stage2_cells(p, layer, head, np.concatenate(rows_of), S, edges, window) / size
    st2 = np.empty((g, g))
    k = 0
    for b, rws in enumerate(rows_of):
        st2[b] = pooled[k:k + rws.size].mean(0)
        k += rws.size
    return HeadPicture(layer=layer, head=head, length=S, true_mask=true_pic, stage2=st2, stage2_exact=exact)


def tiles(p: Profile, size: int) -> np.ndarray:
    """Every head's true mask downsampled to `size x size` cells: float64 `[N_L, H, t, t]`."""
    t = min(size, p.pcl)
    out = np.empty((p.n_layers, p.n_heads, t, t))
    packed = p.true_mask_packed
    for layer in range(p.n_layers):
        out[layer] = pool_packed(np.asarray(packed[layer]), p.pcl, t)
    return out
