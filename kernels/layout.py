"""Block layouts of the DAM Stage-2 mask, FlexAttention-style, built without any `S x S` tensor.

For one layer and a sequence of `S` tokens, query rows are cut into blocks of `block_m` and keys
into blocks of `block_n`. For every (query head, query block) the layout lists

- `kv_indices[h, qb, :kv_num_blocks[h, qb]]`: key blocks holding at least one allowed pair but
  not only allowed pairs ("partial": the kernel evaluates the element mask there), and
- `full_kv_indices[h, qb, :full_kv_num_blocks[h, qb]]`: key blocks whose every pair is allowed
  ("full": the kernel skips the mask),

both sorted ascending and padded with 0. This is the pair of tensors that
`torch.nn.attention.flex_attention.BlockMask.from_kv_blocks` takes (without its batch axis).

Semantics, chosen so that a layout for length `S` is exact and cheap:
- "kept" (partial or full) = the block holds an allowed pair `(i, j)` with `i, j < S`: the
  block-reduction (`any`) of `stage2_mask(S)`, exactly.
- "full" = every cell of the block is allowed by the Stage-2 rule, also the padding cells of a
  last, partial query block (rows `>= S`). So a full block never needs a bounds check: all its
  keys lie at or before the first row of its query block, hence below `S`.

How it avoids `S x S`: rows below `L` read the true mask `M` (one dense `ceil(L) x ceil(L)`
evaluation per head, cached per block shape, independent of `S`). Rows at or beyond `L` see
only keys `j` in `C` (all below `L`) and keys with `i - j` in `R` (plus the diagonal guard,
offset 0). So a query block beyond `L` is a candidate only against the key blocks below `L`
and a band of about `(L + block_m) / block_n` key blocks behind it; whether a band block holds
an allowed pair is one prefix-sum lookup on `R`, because the offsets `i - j` of a block form one
integer interval. Cost: O(H x nQ x (L / block_n)) per layer, plus the O(H x L^2) first part once.

A sliding-window layer (`i - j < W`) takes `window_layout` of that layout: blocks wholly left of
the window dropped, full blocks crossing its edge demoted to partial (where the kernel masks per
element), so "kept" over-approximates by at most the blocks on the window's edge.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch

from .stage2 import stage2_rows
from .word_tables import DeviceMasks, kernel_tables, tables_from_packed

__all__ = ["BlockLayout", "build_layout", "window_layout", "layout_for", "device_masks", "DeviceMasks",
           "kernel_tables"]


@dataclass(frozen=True)
class BlockLayout:
    """Partial and full key blocks per (query head, query block) for one layer and length.

    Index tensors are int32 and live on `kv_indices.device`; padding entries are 0.
    """

    kv_num_blocks: torch.Tensor  # [H, nQ] int32: partial blocks per query block
    kv_indices: torch.Tensor  # [H, nQ, maxP] int32
    full_kv_num_blocks: torch.Tensor  # [H, nQ] int32: full blocks per query block
    full_kv_indices: torch.Tensor  # [H, nQ, maxF] int32
    length: int  # S
    block_m: int  # query rows per block
    block_n: int  # keys per block
    partial_share: float | None = None  # partial / kept blocks, known when built on the CPU
    window: int | None = None  # the sliding window it was cut to (window_layout), None: none

    @property
    def n_heads(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def n_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def n_kv_blocks(self) -> int:
        return -(-self.length // self.block_n)

    def to(self, device) -> BlockLayout:
        return BlockLayout(self.kv_num_blocks.to(device), self.kv_indices.to(device),
                           self.full_kv_num_blocks.to(device), self.full_kv_indices.to(device),
                           self.length, self.block_m, self.block_n, self.partial_share, self.window)

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept, full) as bool `[H, nQ, nK]`: for tests and small lengths only."""
        return (_dense(self.kv_num_blocks, self.kv_indices, self.n_kv_blocks)
                | _dense(self.full_kv_num_blocks, self.full_kv_indices, self.n_kv_blocks),
                _dense(self.full_kv_num_blocks, self.full_kv_indices, self.n_kv_blocks))

    def kept_blocks(self) -> int:
        """Number of (head, query block, key block) triples the kernel computes."""
        return int(self.kv_num_blocks.sum()) + int(self.full_kv_num_blocks.sum())

    def causal_blocks(self) -> int:
        """Blocks a dense causal kernel of the same block shape computes (all heads)."""
        qb = torch.arange(self.n_q_blocks, dtype=torch.int64)
        last_row = torch.clamp((qb + 1) * self.block_m, max=self.length) - 1
        return int((last_row // self.block_n + 1).sum()) * self.n_heads

    def kept_fraction(self) -> float:
        """Kept blocks over causal blocks: the fraction of a dense causal kernel's work done."""
        return self.kept_blocks() / self.causal_blocks()

    def to_string(self, head: int = 0, max_blocks: int = 64) -> str:
        """One line per query block: `#` full, `+` partial, `.` skipped (first `max_blocks`)."""
        kept, full = self.to_dense()
        lines = []
        for qb in range(min(self.n_q_blocks, max_blocks)):
            lines.append("".join("#" if full[head, qb, kb] else "+" if kept[head, qb, kb] else "."
                                 for kb in range(min(self.n_kv_blocks, max_blocks))))
        return "\n".join(lines)


def _dense(num: torch.Tensor, idx: torch.Tensor, n_kv: int) -> torch.Tensor:
    H, nQ = num.shape
    out = torch.zeros(H, nQ, n_kv + 1, dtype=torch.bool, device=num.device)
    valid = torch.arange(idx.shape[-1], device=num.device) < num[..., None].long()
    out.scatter_(-1, torch.where(valid, idx.long(), n_kv), True)
    return out[..., :n_kv]


def _compact(flags: torch.Tensor, cand: torch.Tensor, ascending: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the candidate block ids where `flags` holds, left-aligned in ascending order.

    flags bool `[H, n, K]`, cand int64 `[n, K]` or `[H, n, K]`, ascending along K unless `ascending` is False
    (then sorted here). Returns (num `[H, n]`, idx `[H, n, max(num)]`) with padding 0.
    """
    num = flags.sum(-1)
    width = int(num.max()) if num.numel() else 0
    if not ascending:
        big = torch.iinfo(torch.int64).max
        idx = torch.where(flags, cand.expand_as(flags), big).sort(-1).values[..., :width]
        return num, torch.where(idx == big, 0, idx)
    # Each kept id goes to its rank among the kept (a prefix count: no sort), the others to a spare slot, dropped.
    slot = torch.where(flags, flags.cumsum(-1) - 1, width)
    idx = torch.zeros(*flags.shape[:-1], width + 1, dtype=torch.int64, device=flags.device)
    idx.scatter_(-1, slot, cand.expand_as(flags).to(torch.int64))
    return num, idx[..., :width]


def _prefix(x: torch.Tensor) -> torch.Tensor:
    """`[..., n]` bool -> int64 `[..., n + 1]` exclusive prefix sums."""
    return torch.nn.functional.pad(x.to(torch.int64).cumsum(-1), (1, 0))


def _count(prefix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Set entries in the inclusive ranges `[lo, hi]` (clipped to the array) per head.

    prefix `[H, n + 1]`; lo, hi int64 of any shape `X`; returns `[H, *X]`.
    """
    n = prefix.shape[-1] - 1
    a = lo.clamp(0, n)
    b = (hi + 1).clamp(0, n)
    b = torch.maximum(a, b)
    H = prefix.shape[0]
    flat_a, flat_b = a.reshape(1, -1).expand(H, -1), b.reshape(1, -1).expand(H, -1)
    out = prefix.gather(-1, flat_b) - prefix.gather(-1, flat_a)
    return out.reshape(H, *lo.shape)


def _near_blocks(true_mask, offsets, columns, n_rows: int, block_m: int, block_n: int):
    """Exact (kept-in-infinite-sequence, full) for the query blocks covering rows `[0, n_rows)`.

    Returns bool `[H, nq, nk]` twice plus the dense rows `[H, nq*bm, nk*bn]` restricted later.
    """
    H, L, _ = true_mask.shape
    nq = -(-n_rows // block_m)
    nk = -(-(nq * block_m) // block_n)
    R0, K0 = nq * block_m, nk * block_n
    out = torch.zeros(H, R0, K0, dtype=torch.bool)
    # Rows below L: the true mask plus the diagonal guard (keys >= L are never causal there).
    out[:, :L, :L] = true_mask
    out[:, torch.arange(L), torch.arange(L)] = True
    if R0 > L:  # the padding rows of the last block below L follow the pattern rule
        out[:, L:, :] = stage2_rows(true_mask, offsets, columns, torch.arange(L, R0), K0)
    return out


def _reduce_blocks(dense: torch.Tensor, block_m: int, block_n: int):
    """Block-wise (any, all) of a bool `[H, nq*bm, nk*bn]` tensor, as bool `[H, nq, nk]` twice."""
    H, R0, K0 = dense.shape
    nq, nk = R0 // block_m, K0 // block_n
    if block_n % 8 == 0 and dense.is_contiguous():
        # Eight bools per int64 word: the reductions touch 8x fewer elements.
        words = dense.view(torch.uint8).view(torch.int64).view(H, nq, block_m, nk, block_n // 8)
        ones = 0x0101010101010101
        kept = (words != 0).any(4).any(2)
        full = (words == ones).all(4).all(2)
        return kept, full
    blocks = dense.view(H, nq, block_m, nk, block_n)
    return blocks.any(4).any(2), blocks.all(4).all(2)


_NEAR_CACHE: dict = {}


def _near_cached(key, true_mask, offsets, columns, n_rows, block_m, block_n):
    hit = _NEAR_CACHE.get(key)
    if hit is None:
        dense = _near_blocks(true_mask, offsets, columns, n_rows, block_m, block_n)
        kept, full = _reduce_blocks(dense, block_m, block_n)
        hit = (dense, kept, full)
        if key is not None:
            if len(_NEAR_CACHE) > 256:
                _NEAR_CACHE.clear()
            _NEAR_CACHE[key] = hit
    return hit


def build_layout(
    true_mask: torch.Tensor,  # [H, L, L] bool, causal
    offsets: torch.Tensor,  # [H, L] bool
    columns: torch.Tensor,  # [H, L] bool
    length: int,
    block_m: int,
    block_n: int,
    *,
    cache_key=None,
) -> BlockLayout:
    """The exact block layout of the Stage-2 mask of these heads for `length` tokens, on the CPU.

    `cache_key`, when given, names the `(M, R, C, block_m, block_n)` combination so that the
    length-independent first `L` rows are block-reduced once.
    """
    H, L, _ = true_mask.shape
    S = int(length)
    BM, BN = int(block_m), int(block_n)
    nQ = -(-S // BM)
    nK = -(-S // BN)
    qA = min(nQ, -(-L // BM))  # query blocks holding a row below L: read M exactly
    # ---- part A: query blocks [0, qA) ------------------------------------------------------
    dense, kept_all, full_all = _near_cached(cache_key, true_mask, offsets, columns, L, BM, BN)
    nkA_all = dense.shape[2] // BN
    nkA = min(nkA_all, nK)
    rows_a, keys_a = qA * BM, nkA * BN
    if S < rows_a or S < keys_a:  # cells beyond S do not count as kept
        valid = (torch.arange(rows_a) < S)[:, None] & (torch.arange(keys_a) < S)[None, :]
        part = dense[:, :rows_a, :keys_a] & valid
        kept_a = part.reshape(H, qA, BM, nkA, BN).any(4).any(2)
    else:
        kept_a = kept_all[:, :qA, :nkA]
    full_a = full_all[:, :qA, :nkA]
    cand_a = torch.arange(nkA).expand(qA, nkA)
    p_num_a, p_idx_a = _compact(kept_a & ~full_a, cand_a)
    f_num_a, f_idx_a = _compact(full_a, cand_a)
    if qA == nQ:
        return _finish(p_num_a, p_idx_a, f_num_a, f_idx_a, S, BM, BN)

    # ---- part B: query blocks [qA, nQ), every row >= L --------------------------------------
    Rg = offsets.clone()
    Rg[:, 0] = True  # the diagonal guard is offset 0 for rows beyond L
    C = columns
    PR = _prefix(Rg)  # [H, L+1]
    qb = torch.arange(qA, nQ, dtype=torch.int64)
    q0 = qb * BM
    q1 = torch.clamp(q0 + BM, max=S)
    nKL = -(-L // BN)  # key blocks holding a key below L: the column candidates
    # Band candidates: key blocks reached by offsets in [0, L) from rows [q0, q1).
    W = (L - 1 + BM - 1) // BN + 2
    kb_lo = torch.clamp(q0 - (L - 1), min=0) // BN
    kb_hi = (q1 - 1) // BN
    band = kb_lo[:, None] + torch.arange(W)[None, :]  # [nB, W]
    band_ok = (band <= kb_hi[:, None]) & (band >= nKL)
    cand = torch.cat([torch.arange(nKL).expand(len(qb), nKL), band], dim=1)  # [nB, nKL + W]
    cand_ok = torch.cat([torch.ones(len(qb), nKL, dtype=torch.bool), band_ok], dim=1)
    k0 = cand * BN
    # kept: a matched offset in the interval of (i - j) over the block, or a matched column.
    hits = _count(PR, q0[:, None] - k0 - BN + 1, q1[:, None] - 1 - k0) > 0  # [H, nB, K]
    col_any = _count(_prefix(C), torch.arange(nKL) * BN, torch.arange(nKL) * BN + BN - 1) > 0
    kept = hits.clone()
    kept[:, :, :nKL] |= col_any[:, None, :]
    kept &= cand_ok
    # full: every cell (i, j) of the padded block has j in C or all of i - j in R (rows q0..q0+BM-1).
    # ok[a]: offsets a .. a+BM-1 all matched, i.e. the whole column j = q0 - a is covered.
    a = torch.arange(L)
    ok = _count(PR, a, a + BM - 1) == BM  # [H, L]; False where a + BM - 1 >= L (clipped count)
    PO = _prefix(ok)
    delta = q0[:, None] - k0  # [nB, K]
    band_full = (delta - BN + 1 >= 0) & (_count(PO, delta - BN + 1, delta) == BN)
    full = band_full.clone()
    # Column candidates need the per-key rule (C or covered); exact for every query block, but
    # only near ones (offsets reach back below L) can differ from "all keys in C".
    t = torch.arange(BN)
    j = torch.arange(nKL)[:, None] * BN + t[None, :]  # [nKL, BN]
    Cext = torch.nn.functional.pad(C, (0, nKL * BN - L))[:, j]  # [H, nKL, BN]
    col_full = Cext.all(-1)  # [H, nKL]
    full[:, :, :nKL] = col_full[:, None, :]
    near = q0 - (nKL * BN - 1) <= L - 1  # some offset below L reaches a column block
    if bool(near.any()):
        qn = q0[near]
        d = qn[:, None, None] - j[None]  # [nN, nKL, BN]
        okext = torch.nn.functional.pad(ok, (0, 1))  # index L = False
        dd = torch.where((d >= 0) & (d < L), d, L)
        covered = okext[:, dd.reshape(-1)].reshape(-1, *dd.shape)  # [H, nN, nKL, BN]
        full[:, near, :nKL] = (covered | Cext[:, None]).all(-1)
    full &= cand_ok
    kept |= full
    p_num_b, p_idx_b = _compact(kept & ~full, cand)
    f_num_b, f_idx_b = _compact(full, cand)
    return _finish(torch.cat([p_num_a, p_num_b], 1), _cat_pad(p_idx_a, p_idx_b),
                   torch.cat([f_num_a, f_num_b], 1), _cat_pad(f_idx_a, f_idx_b), S, BM, BN)


def _cat_pad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    w = max(a.shape[-1], b.shape[-1])
    pad = lambda x: torch.nn.functional.pad(x, (0, w - x.shape[-1]))  # noqa: E731
    return torch.cat([pad(a), pad(b)], dim=1)


def window_layout(layout: BlockLayout, window: int) -> BlockLayout:
    """`layout` cut to a sliding window: key block `kb` stays for query block `qb` if its nearest
    pair is inside (`qb*BM - (kb*BN + BN - 1) < W`), and stays full only if its farthest pair,
    padding rows included, is inside too (`qb*BM + BM - 1 - kb*BN < W`); else it is partial."""
    assert window >= 1 and layout.window is None, "cut an unwindowed layout to a window of at least 1"
    BM, BN = layout.block_m, layout.block_n
    dev = layout.kv_indices.device

    def cut(num, idx):
        valid = torch.arange(idx.shape[-1], device=dev) < num[..., None].long()
        q0 = (torch.arange(num.shape[1], device=dev) * BM)[None, :, None]
        k0 = idx.long() * BN
        return idx.long(), valid & (q0 - (k0 + BN - 1) < window), valid & (q0 + BM - 1 - k0 < window)

    p_idx, p_some, _ = cut(layout.kv_num_blocks, layout.kv_indices)
    f_idx, f_some, f_every = cut(layout.full_kv_num_blocks, layout.full_kv_indices)
    cand = torch.cat([p_idx, f_idx], -1)
    p_num, p_idx = _compact(torch.cat([p_some, f_some & ~f_every], -1), cand, ascending=False)
    f_num, f_idx = _compact(torch.cat([torch.zeros_like(p_some), f_every], -1), cand, ascending=False)
    return _finish(p_num, p_idx, f_num, f_idx, layout.length, BM, BN, window)


def _finish(p_num, p_idx, f_num, f_idx, S, BM, BN, window=None) -> BlockLayout:
    # Keep at least one column so index tensors always have a valid pointer.
    if p_idx.shape[-1] == 0:
        p_idx = torch.zeros(*p_idx.shape[:-1], 1, dtype=p_idx.dtype, device=p_idx.device)
    if f_idx.shape[-1] == 0:
        f_idx = torch.zeros(*f_idx.shape[:-1], 1, dtype=f_idx.dtype, device=f_idx.device)
    i32 = torch.int32
    n_part, n_full = int(p_num.sum()), int(f_num.sum())
    return BlockLayout(p_num.to(i32).contiguous(), p_idx.to(i32).contiguous(),
                       f_num.to(i32).contiguous(), f_idx.to(i32).contiguous(), S, BM, BN,
                       n_part / max(1, n_part + n_full), window)


# ---- per-profile caches -------------------------------------------------------------------
_LAYOUTS: dict = {}
_MASKS: dict = {}
_MAX_ENTRIES = 512


def _lookup(cache: dict, key, profile):
    hit = cache.get(key)
    if hit is not None and hit[0]() is profile:
        return hit[1]
    return None


def _store(cache: dict, key, profile, value):
    if len(cache) >= _MAX_ENTRIES:
        cache.clear()
    cache[key] = (weakref.ref(profile), value)
    return value


def device_masks(profile, layer: int, device) -> DeviceMasks:
    """The bitmaps of `(M, R, C)` of one layer on `device`, cached per (profile, layer, device)."""
    device = torch.device(device)
    key = (id(profile), layer, str(device))
    hit = _lookup(_MASKS, key, profile)
    if hit is not None:
        return hit
    packed = getattr(profile, "true_mask_packed", None)
    if packed is not None and packed.dtype == torch.uint8 and sys.byteorder == "little":  # no unpacking
        dm = tables_from_packed(packed[layer], profile.offsets[layer], profile.columns[layer])
    else:
        dm = kernel_tables(profile.layer_true_mask(layer), profile.offsets[layer], profile.columns[layer])
    return _store(_MASKS, key, profile, dm.to(device))


def layout_for(profile, layer: int, length: int, block_m: int, block_n: int, device=None,
               window: int | None = None) -> BlockLayout:
    """The block layout of one profile layer for `length` tokens (cut to a sliding `window` when
    given), cached per (profile, layer, length, block sizes, device, window). `profile` is a
    `dam_cli.artifact.profile.Profile` (duck-typed)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (id(profile), layer, int(length), block_m, block_n, str(dev)) + ((int(window),) if window else ())
    hit = _lookup(_LAYOUTS, key, profile)
    if hit is not None:
        return hit
    if window is not None:
        base = layout_for(profile, layer, length, block_m, block_n, "cpu")
        return _store(_LAYOUTS, key, profile, window_layout(base, int(window)).to(dev))
    near_key = (id(profile), layer, block_m, block_n)
    if _lookup(_LAYOUTS, ("near", near_key), profile) is None:
        _NEAR_CACHE.pop(near_key, None)  # a new profile reused an old id: drop its stale entry
        _store(_LAYOUTS, ("near", near_key), profile, True)
    lay = build_layout(profile.layer_true_mask(layer), profile.offsets[layer].bool(),
                       profile.columns[layer].bool(), length, block_m, block_n, cache_key=near_key)
    return _store(_LAYOUTS, key, profile, lay.to(dev))
