"""The word tables of the CPU block-sparse path (`gathered.py`): which key blocks a query block keeps, and the
64-bit mask words of each kept block's rows.

Read from the tables the kernels read (`word_tables.DeviceMasks`): rows below L read `M`, rows beyond read the offset
words and the matched columns, a sliding window cuts the words further. `BlockTables` holds the length-independent
block summaries of one layer's words for a block shape (made once per tables and shape), `kept_blocks` the blocks
of a call's query blocks that may hold an allowed pair, `list_words` the static words of an item over its blocks.
Pure tensor code on the CPU; nothing of size `S x S` is built.
"""

from __future__ import annotations

import weakref

import torch

from .word_tables import _pack64


def ones_below(n: torch.Tensor) -> torch.Tensor:
    """int64 words with the low `n` bits set, `0 <= n <= 64`."""
    return torch.where(n >= 64, -1, (torch.ones((), dtype=torch.int64) << n.clamp(max=63)) - 1)


def block_word(block_n: int) -> int:  # the word of a whole key block
    return (1 << block_n) - 1 if block_n < 64 else -1


def column_words(masks, block_n: int) -> torch.Tensor:
    """The matched columns `C` as words per key block of `block_n` keys: int64 `[H, ceil(L / block_n)]`."""
    H, L = masks.columns.shape
    nk = -(-L // block_n)
    c = torch.nn.functional.pad(masks.columns.bool(), (0, nk * block_n - L)).view(H, nk, block_n)
    return _pack64(torch.nn.functional.pad(c, (0, 64 - block_n)))


def static_words(masks, cols: torch.Tensor, h: torch.Tensor, rows: torch.Tensor, kb: torch.Tensor,
                 block_n: int) -> torch.Tensor:
    """Stage-2 words of rows `rows` against key blocks `kb` of heads `h` (broadcast together, int64):
    bit t is key `kb * block_n + t`. Rows below L read `M` (causal, with the guard), rows beyond read
    the matched offsets and columns (`cols` from `column_words`): causal by construction."""
    L = masks.pcl
    NW = masks.mask_words.shape[-1]
    WL = masks.offset_words.shape[-1]
    k0 = kb * block_n
    near = None
    if not bool((rows >= L).all()):
        near = rows < L
        mi = (h * L + rows.clamp(max=L - 1)) * NW + (k0 >> 6).clamp(max=NW - 1)
        mw = torch.take(masks.mask_words, mi)
        if block_n < 64:
            mw = mw >> (k0 & 63)
        mw = torch.where(near & (k0 < L), mw & block_word(block_n), 0)
        if bool(near.all()):
            return mw
    e = rows - k0
    ow = torch.take(masks.offset_words, h * WL + e.clamp(0, WL - 1))
    nkl = cols.shape[-1]
    cw = torch.where(kb < nkl, torch.take(cols, h * nkl + kb.clamp(max=nkl - 1)), 0)
    beyond = torch.where((e >= 0) & (e < WL), ow & block_word(block_n), 0) | cw
    return beyond if near is None else torch.where(near, mw, beyond)


def window_bits(rows: torch.Tensor, kb: torch.Tensor, block_n: int, window: int) -> torch.Tensor:
    """Words of the keys of blocks `kb` inside the sliding `window` of rows `rows` (`i - j < W`; broadcast)."""
    return ~ones_below((rows - window + 1 - kb * block_n).clamp(0, block_n))


class BlockTables:
    """Length-independent block summaries of one layer's words for `(block_m, block_n)` (cached per tables):

    `near_kept[h, qb, kb]`: a row below L of query block `qb` allows a key of key block `kb` (`[H, nQL, nKL]`);
    `offsets_any[h, e + block_m - 1]`: the OR of the offset words `e .. e + block_m - 1`, i.e. the keys of a
    key block at `q0 - e` that rows `q0 .. q0 + block_m - 1` beyond L reach by an offset; `cols`: `column_words`;
    `offset_words`: the offset words with a zero word at both ends (index `e + 1`, `-1 <= e <= L + 64`).
    """

    def __init__(self, masks, block_m: int, block_n: int):
        H, L, NW = masks.mask_words.shape
        low = block_word(block_n)
        mw = masks.mask_words
        if block_n < 64:  # sub-words: [H, L, NW * 64 / block_n]
            shifts = torch.arange(0, 64, block_n)
            mw = ((mw[..., None] >> shifts) & low).reshape(H, L, -1)
        nql, nkl = -(-L // block_m), -(-L // block_n)
        rows = torch.nn.functional.pad(mw, (0, 0, 0, nql * block_m - L)).view(H, nql, block_m, -1)
        self.near_kept = (rows != 0).any(2)[..., :nkl]
        ow = masks.offset_words
        WL = ow.shape[-1]
        padded = torch.nn.functional.pad(ow, (block_m - 1, block_m - 1))
        acc = torch.zeros(H, WL + block_m - 1, dtype=torch.int64)
        for r in range(block_m):
            acc |= padded[:, r: r + WL + block_m - 1]
        self.offsets_any = acc & low
        self.cols = column_words(masks, block_n)
        self.offset_words = torch.nn.functional.pad(ow, (1, 1))


_TABLES: dict = {}


def block_tables(masks, block_m: int, block_n: int) -> BlockTables:
    """`BlockTables` of these word tables, made once per (tables, block shape) while the tables live."""
    key = (id(masks), block_m, block_n)
    hit = _TABLES.get(key)
    if hit is None or hit[0]() is not masks:
        if len(_TABLES) > 256:
            _TABLES.clear()
        hit = _TABLES[key] = (weakref.ref(masks), BlockTables(masks, block_m, block_n))
    return hit[1]


def kept_blocks(masks, tab: BlockTables, h: torch.Tensor, qb: torch.Tensor, start: int, Sq: int, n_keys: int,
                block_m: int, block_n: int, window: int | None) -> torch.Tensor:
    """bool `[len(h), len(qb), n_keys blocks]`: key blocks that may hold an allowed static pair of head `h`,
    query block `qb` (a superset: exact per row block, whatever rows of the block the call holds)."""
    L = masks.pcl
    nK = -(-n_keys // block_n)
    kb = torch.arange(nK)
    q0 = qb * block_m
    e = (q0[:, None] - kb[None, :] * block_n) + block_m - 1  # [nq, nK] index into offsets_any
    WA = tab.offsets_any.shape[-1]
    ok = (e >= 0) & (e < WA)
    hits = torch.take(tab.offsets_any, h[:, None, None] * WA + e.clamp(0, WA - 1)[None]) != 0
    kept = hits & ok[None]
    nkl = tab.cols.shape[-1]
    kept[:, :, :nkl] |= (tab.cols[h, : min(nkl, nK)] != 0)[:, None, :]
    near = q0 < L
    if bool(near.any()):  # rows below L read M; a block straddling L keeps both rules' blocks
        nq_near = int(near.sum())
        part = torch.zeros(len(h), nq_near, nK, dtype=torch.bool)
        nk = min(nK, tab.near_kept.shape[-1])
        part[..., :nk] = tab.near_kept[h][:, qb[near]][..., :nk]
        whole = (q0[near] + block_m <= L)[None, :, None]
        kept[:, near] = torch.where(whole, part, part | kept[:, near])
    last = torch.clamp(q0 + block_m, max=start + Sq) - 1
    allowed = kb[None, :] <= (last // block_n)[:, None]
    if window is not None:
        first = torch.clamp(q0, min=start)
        allowed &= kb[None, :] * block_n + block_n - 1 >= (first - window + 1)[:, None]
    return kept & allowed[None]


def list_words(masks, tab: BlockTables, h: torch.Tensor, q0: torch.Tensor, ids: torch.Tensor,
               slot_ok: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Static int64 words `[n, block_m, P]` of items (head `h`, rows `q0 ..`) over key blocks `ids`, zero in
    unused slots (`slot_ok` false)."""
    L = masks.pcl
    r = torch.arange(block_m)
    if bool((q0 >= L).all()):  # every row beyond L: the offset words and the columns
        d, cw = beyond_terms(tab, h, q0, ids, slot_ok, block_n)
        return beyond_words(tab, d[:, None, :], h[:, None], cw[:, None, :], block_m, block_n)[:, 0]
    words = static_words(masks, tab.cols, h[:, None, None], q0[:, None, None] + r[None, :, None], ids[:, None, :],
                         block_n)
    return torch.where(slot_ok[:, None, :], words, 0)


def beyond_terms(tab: BlockTables, h: torch.Tensor, q0: torch.Tensor, ids: torch.Tensor, slot_ok: torch.Tensor,
                 block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two row-independent terms of the words of items whose rows all lie at or beyond L: the distance `d`
    `[..., P]` from a block's first key to the item's first row (unused slots: far below, so they read the zero
    word) and the column words `cw` `[..., P]` (zero in unused slots). `h` and `q0` broadcast against `ids`'s
    leading dims with one trailing dim added (`q0[:, None]`-style), `slot_ok` is shaped like `ids`."""
    d = torch.where(slot_ok, q0[..., None] - ids * block_n, -(1 << 40))
    nkl = tab.cols.shape[-1]
    cw = torch.where((ids < nkl) & slot_ok, tab.cols[h[..., None], ids.clamp(max=nkl - 1)], 0)
    return d, cw


def beyond_words(tab: BlockTables, d: torch.Tensor, h: torch.Tensor, cw: torch.Tensor, block_m: int,
                 block_n: int) -> torch.Tensor:
    """Words `[n, Gc, block_m, P]` from `beyond_terms`: `d` `[n, 1 or Gc, P]`, heads `h` `[n, Gc]`, `cw`
    `[n, Gc, P]` (a whole block's `cw` may be all ones): the offset word of distance `d + row` OR the columns."""
    WP = tab.offset_words.shape[-1]
    e = (d[:, :, None, :] + torch.arange(block_m)[:, None]).clamp_(-1, WP - 2)  # [n, 1 or Gc, bm, P]
    words = torch.take(tab.offset_words, e + (h * WP + 1)[:, :, None, None])
    if block_n < 64:
        words &= block_word(block_n)
    return words.bitwise_or_(cw[:, :, None, :])


def block_ids(member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool `[n, nK]` -> (ascending block ids `[n, P]` padded with 0, count `[n]`), P = max count."""
    nK = member.shape[-1]
    count = member.sum(-1)
    keyed = torch.where(member, torch.arange(nK), nK)
    ids = keyed.sort(-1).values[:, : max(1, int(count.max()))]
    return torch.where(ids == nK, 0, ids), count
