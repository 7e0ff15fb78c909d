"""Block-sparse DAM attention on the CPU in PyTorch: softmax over the gathered kept key blocks.

The CPU peer of the Triton prefill kernel (`prefill.py`), exact like the reference (`reference.py`).
Query rows are cut into blocks of `block_m`, keys into blocks of `block_n` (16, 32 or 64: one
64-bit word holds a row's mask bits of a key block). The Stage-2 mask is read from the word tables
the kernels read (`layout.DeviceMasks`, as `prefill.dam_tile_mask` does), causal rule and diagonal
guard included; the blocks holding an allowed pair come from length-independent block summaries of
those tables (`BlockTables`), so nothing of size `S x S` is ever built.

An item is (kv head, query block): the rows of its grouped query heads stacked over the union of
their block lists (kept static blocks and selected blocks), key and value blocks gathered once per
item (never a copy per query head), each row under its own head's words, expanded into an additive
mask by a byte lookup table. Items of similar length run in groups through torch's CPU flash
attention in float32 (soft-capping: matmul, `tanh`, softmax). A call whose rows lie in one query
block (a decode step) reads every key under its rows' mask instead: no lists to build.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref

import torch

from .dynamic import mass_scores, mass_select, scores_block_mass
from .layout import _pack64

# Elements (rows x gathered keys) of one group's scores: big enough to keep torch's per-call cost
# small, small enough that its mask, keys and values stay in the caches (4 MiB each here).
GROUP_ELEMENTS = 1 << 20
# float32 [256, 8]: bit u of byte b -> 0.0 (allowed) or -inf (masked) in column u.
_LUT = torch.zeros(256, 8).masked_fill_((torch.arange(256)[:, None] >> torch.arange(8)) & 1 == 0, float("-inf"))


def additive_mask(words: torch.Tensor, block_n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """int64 words `[..., P]` (bit t: key t of the block allowed) -> float32 `[..., P * block_n]`
    of 0.0 / -inf, key blocks side by side (little-endian bytes: byte u holds keys 8u .. 8u+7).
    `out`: a float32 buffer of at least that many elements to write into."""
    by = words.contiguous().view(torch.uint8).view(*words.shape, 8)[..., : block_n // 8]
    idx = by.reshape(-1).long()
    dst = None if out is None else out[: idx.numel() * 8].view(idx.numel(), 8)
    res = torch.index_select(_LUT, 0, idx, out=dst)
    return res.view(*words.shape[:-1], words.shape[-1] * block_n)


_SCRATCH = threading.local()


def scratch(name: str, numel: int) -> torch.Tensor:
    """A float32 buffer of `numel` elements kept per thread between calls: fresh large allocations
    cost page faults on every group, reused ones stay mapped (and in the caches). A normal tensor, also
    when made under `torch.inference_mode` (which may write it; an inference tensor may not be written later)."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):
            buf = bufs[name] = torch.empty(max(numel, 1))
    return buf[:numel]


def _ones(n: torch.Tensor) -> torch.Tensor:
    """int64 words with the low `n` bits set, `0 <= n <= 64`."""
    return torch.where(n >= 64, -1, (torch.ones((), dtype=torch.int64) << n.clamp(max=63)) - 1)


def _low(block_n: int) -> int:  # the word of a whole key block
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
        mw = torch.where(near & (k0 < L), mw & _low(block_n), 0)
        if bool(near.all()):
            return mw
    e = rows - k0
    ow = torch.take(masks.offset_words, h * WL + e.clamp(0, WL - 1))
    nkl = cols.shape[-1]
    cw = torch.where(kb < nkl, torch.take(cols, h * nkl + kb.clamp(max=nkl - 1)), 0)
    beyond = torch.where((e >= 0) & (e < WL), ow & _low(block_n), 0) | cw
    return beyond if near is None else torch.where(near, mw, beyond)


def window_bits(rows: torch.Tensor, kb: torch.Tensor, block_n: int, window: int) -> torch.Tensor:
    """Words of the keys of blocks `kb` inside the sliding `window` of rows `rows` (`i - j < W`; broadcast)."""
    return ~_ones((rows - window + 1 - kb * block_n).clamp(0, block_n))


class BlockTables:
    """Length-independent block summaries of one layer's words for `(block_m, block_n)` (cached per tables):

    `near_kept[h, qb, kb]`: a row below L of query block `qb` allows a key of key block `kb` (`[H, nQL, nKL]`);
    `offsets_any[h, e + block_m - 1]`: the OR of the offset words `e .. e + block_m - 1`, i.e. the keys of a
    key block at `q0 - e` that rows `q0 .. q0 + block_m - 1` beyond L reach by an offset; `cols`: `column_words`;
    `offset_words`: the offset words with a zero word at both ends (index `e + 1`, `-1 <= e <= L + 64`).
    """

    def __init__(self, masks, block_m: int, block_n: int):
        H, L, NW = masks.mask_words.shape
        low = _low(block_n)
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
        WP = tab.offset_words.shape[-1]
        d = torch.where(slot_ok, q0[:, None] - ids * block_n, -(1 << 40))  # unused slots read the zero word
        e = (d[:, None, :] + r[None, :, None]).clamp_(-1, WP - 2)
        words = torch.take(tab.offset_words, e.add_((h * WP + 1)[:, None, None]))
        nkl = tab.cols.shape[-1]
        cw = torch.where((ids < nkl) & slot_ok, tab.cols[h[:, None], ids.clamp(max=nkl - 1)], 0)
        words |= cw[:, None, :]
        return words & _low(block_n) if block_n < 64 else words
    words = static_words(masks, tab.cols, h[:, None, None], q0[:, None, None] + r[None, :, None], ids[:, None, :],
                         block_n)
    return torch.where(slot_ok[:, None, :], words, 0)


def _compact(member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool `[n, nK]` -> (ascending block ids `[n, P]` padded with 0, count `[n]`), P = max count."""
    nK = member.shape[-1]
    count = member.sum(-1)
    keyed = torch.where(member, torch.arange(nK), nK)
    ids = keyed.sort(-1).values[:, : max(1, int(count.max()))]
    return torch.where(ids == nK, 0, ids), count


_THREADS = threading.local()


def _busy() -> bool:
    """Other work on the cores: more runnable threads than cores plus one, now and over the last minute (this
    run's own stay below; Linux `/proc/loadavg`, else `os.getloadavg` alone; False where unknown)."""
    try:
        with open("/proc/loadavg") as f:
            fields = f.read().split()
        load = min(float(fields[0]), float(fields[3].split("/")[0]))
    except (OSError, ValueError, IndexError):
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return False
    return load > (os.cpu_count() or 1) + 1


@contextlib.contextmanager
def one_thread_when_busy():
    """On a busy machine, run the body on one intra-op thread: there every parallel region waits for a time
    slice of each thread, and the many regions of block lists, masks, gathers and grouped products would set
    the pace. An idle machine keeps its threads. Nested uses keep the outer decision."""
    if getattr(_THREADS, "n", None) is not None or torch.get_num_threads() == 1 or not _busy():
        yield
        return
    _THREADS.n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(_THREADS.n)
        _THREADS.n = None


def _attend(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """q `[n, 1, R, D]` over k, v `[n, 1, K, D]` under an additive mask `[n, 1, R, K]`: float32 `[n, 1, R, D]`.
    Every row must allow a key."""
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    s = torch.tanh(torch.matmul(q, k.transpose(-1, -2)).mul_(scale).div_(softcap)).mul_(softcap)
    return torch.matmul(torch.softmax(s.add_(mask), dim=-1), v)


class _Prefill:
    """One batch row of a multi-block call: padded float32 copies of q, k, v (rows and keys in whole
    blocks) and the output of every (head, query block), filled group by group."""

    def __init__(self, q, k, v, masks, start: int, key_start: int, scale: float, softcap, window, bm: int, bn: int):
        H, Sq, D = q.shape
        self.H, self.G, self.D, self.bm, self.bn = H, H // k.shape[0], D, bm, bn
        self.masks, self.tab, self.start, self.Sq = masks, block_tables(masks, bm, bn), start, Sq
        self.scale, self.softcap, self.window = scale, softcap, window
        self.qb_first = start // bm
        self.nQs = (start + Sq - 1) // bm - self.qb_first + 1
        self.kb_first = key_start // bn
        self.nK = -(-(start + Sq) // bn)
        self.nKs = self.nK - self.kb_first
        self.qp = _padded(q, self.qb_first * bm, self.nQs * bm, start).view(H * self.nQs, bm * D)
        self.kp = _padded(k, self.kb_first * bn, self.nKs * bn, key_start).view(-1, bn * D)
        self.vp = _padded(v, self.kb_first * bn, self.nKs * bn, key_start).view(-1, bn * D)
        self.out = torch.empty(H * self.nQs, bm * D)

    def run(self, g_i: torch.Tensor, qb_i: torch.Tensor, ids: torch.Tensor, count: torch.Tensor, dyn):
        """Items (kv head `g_i`, query block `qb_i`) over their block lists `ids` (`count` long), longest first,
        in groups of at most `GROUP_ELEMENTS` scores; `dyn` `[H, nq, nK]`: each head's selected blocks."""
        G, bm, bn, D = self.G, self.bm, self.bn, self.D
        order = torch.argsort(count, descending=True, stable=True)
        cnt = count[order].tolist()
        i = 0
        while i < len(cnt) and cnt[i] > 0:
            P = cnt[i]
            n = max(1, min(len(cnt) - i, GROUP_ELEMENTS // (G * bm * P * bn)))
            sel = order[i: i + n]
            i += n
            g, qb, g_ids = g_i[sel], qb_i[sel], ids[sel, :P]
            h = (g[:, None] * G + torch.arange(G)).reshape(-1)  # the items' query heads, G per item
            rows = h * self.nQs + (qb - self.qb_first).repeat_interleave(G)
            hid = g_ids.repeat_interleave(G, dim=0)
            q0 = (qb * bm).repeat_interleave(G)
            slot_ok = (torch.arange(P) < count[sel][:, None]).repeat_interleave(G, dim=0)
            words = list_words(self.masks, self.tab, h, q0, hid, slot_ok, bm, bn)
            if dyn is not None:  # a head's selected blocks are whole
                whole = dyn[h, q0 // bm - self.qb_first].gather(1, hid) & slot_ok
                words = torch.where(whole[:, None, :], _low(bn), words)
            if self.window is not None:
                words &= window_bits(q0[:, None, None] + torch.arange(bm)[:, None], hid[:, None, :], bn, self.window)
            blk = (g[:, None] * self.nKs + (g_ids - self.kb_first).clamp(min=0)).reshape(-1)
            qg = torch.index_select(self.qp, 0, rows, out=scratch("q", n * G * bm * D).view(n * G, bm * D))
            kg = torch.index_select(self.kp, 0, blk, out=scratch("k", n * P * bn * D).view(n * P, bn * D))
            vg = torch.index_select(self.vp, 0, blk, out=scratch("v", n * P * bn * D).view(n * P, bn * D))
            mask = additive_mask(words, bn, scratch("mask", n * G * bm * P * bn)).view(n, 1, G * bm, P * bn)
            o = _attend(qg.view(n, 1, G * bm, D), kg.view(n, 1, P * bn, D), vg.view(n, 1, P * bn, D), mask,
                        self.scale, self.softcap)
            self.out.index_copy_(0, rows, o.reshape(n * G, bm * D))

    def result(self) -> torch.Tensor:
        first = self.start - self.qb_first * self.bm
        return self.out.view(self.H, -1, self.D)[:, first: first + self.Sq]


def _padded(x: torch.Tensor, first: int, n_pos: int, offset: int) -> torch.Tensor:
    """float32 `[H, n_pos, D]` holding `x` `[H, S, D]` at positions `offset ..` (`first` is position 0 here),
    zeros around it."""
    out = torch.empty(x.shape[0], n_pos, x.shape[-1])
    a, b = offset - first, offset - first + x.shape[1]
    out[:, :a], out[:, b:], out[:, a:b] = 0, 0, x
    return out


def _prefill_one(q, k, v, masks, full, chosen, dyn_block, start, key_start, scale, window, softcap, bm, bn):
    """One batch row: q `[H, Sq, D]`, k/v `[H_kv, Sk, D]` -> `[H, Sq, D]` float32 (the `full` heads: zero);
    items (kv head, query block) over the union of their heads' block lists (module doc)."""
    H, Sq, H_kv = q.shape[0], q.shape[1], k.shape[0]
    run = _Prefill(q, k, v, masks, start, key_start, scale, softcap, window, bm, bn)
    qb = torch.arange(run.qb_first, run.qb_first + run.nQs)
    member = kept_blocks(masks, run.tab, torch.arange(H), qb, start, Sq, start + Sq, bm, bn, window)  # [H, nq, nK]
    computed = torch.ones(H, 1, 1, dtype=torch.bool) if full is None else ~full.view(H, 1, 1)
    dyn = None
    if chosen is not None:
        sel = chosen[:, (qb * bm) // dyn_block]  # [H, nq, nKd]
        dyn = sel.repeat_interleave(dyn_block // bn, dim=-1)[..., : run.nK]
        dyn = torch.nn.functional.pad(dyn, (0, run.nK - dyn.shape[-1]))
        if window is not None:  # blocks wholly left of every row's window hold nothing
            first = torch.clamp(qb * bm, min=start)
            dyn = dyn & (torch.arange(run.nK) * bn + bn - 1 >= (first - window + 1)[:, None])
        member |= dyn
    union = (member & computed).view(H_kv, run.G, len(qb), run.nK).any(1).view(-1, run.nK)
    run.run(torch.arange(H_kv).repeat_interleave(len(qb)), qb.repeat(H_kv), *_compact(union), dyn)
    out = run.result()
    out[~computed.view(H)] = 0
    return out


def one_block(start: int, Sq: int, block_m: int) -> bool:
    """Whether rows `start .. start+Sq-1` lie in one query block: `gathered_attention` then reads every key
    under the rows' mask (a decode step) and computes the retrieval heads itself."""
    return start // block_m == (start + Sq - 1) // block_m


def _decode_one(q, k, v, masks, chosen, full, dyn_block, start, key_start, scale, window, softcap, bm, bn, by_mass):
    """Rows in one query block: q `[H, Sq, D]` against every key under the rows' mask -> float32 `[H, Sq, D]`.
    `chosen` `[H, nKd]`: the rows' selected blocks, or `by_mass` = (gamma, cap): chosen here by the exact-mass
    rule from the same scores the attention uses (one read of the keys); `full` `[H]`: heads that see every
    causal key."""
    H, Sq, D = q.shape
    H_kv, Sk = k.shape[0], k.shape[1]
    s = mass_scores(q[None], k[None], scale)  # [1, H_kv, G * Sq, Sk], as tail_block_mass computes them
    if by_mass is not None:
        mass = scores_block_mass(s.clone(), start, dyn_block, Sq).reshape(H, -1)
        chosen = mass_select(mass, start // dyn_block, *by_mass)
    nK = -(-(start + Sq) // bn)
    rows = (start + torch.arange(Sq))[None, :, None]
    kb = torch.arange(nK)[None, None, :]
    ids = kb[0].expand(H, nK)
    words = list_words(masks, block_tables(masks, bm, bn), torch.arange(H), torch.full((H,), start), ids,
                       torch.ones(H, nK, dtype=torch.bool), Sq, bn)
    if chosen is not None:  # selected blocks lie before the rows' block: whole and causal
        sel = chosen.repeat_interleave(dyn_block // bn, dim=-1)[..., :nK]  # [H, nK']
        words = torch.where(torch.nn.functional.pad(sel, (0, nK - sel.shape[-1]))[:, None, :], -1, words)
    if full is not None:
        words = torch.where(full[:, None, None], _ones((rows - kb * bn + 1).clamp(0, bn)), words)
    if window is not None:
        words &= window_bits(rows, kb, bn, window)
    mask = additive_mask(words, bn)[..., key_start: key_start + Sk].reshape(1, H_kv, -1, Sk)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    o = torch.matmul(torch.softmax(s.add_(mask), dim=-1), v.float()[None])
    return o.reshape(H, Sq, D)


def gathered_attention(
    q: torch.Tensor,  # [B, H, Sq, D]
    k: torch.Tensor,  # [B, H_kv, Sk, D]
    v: torch.Tensor,  # [B, H_kv, Sk, D]
    masks,  # layout.DeviceMasks of this layer, on the CPU
    *,
    start: int = 0,
    scale: float | None = None,
    chosen: torch.Tensor | None = None,
    dyn_block: int = 0,
    window: int | None = None,
    softcap: float | None = None,
    key_start: int = 0,
    full_heads: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    by_mass: tuple[float, int] | None = None,
) -> torch.Tensor:
    """DAM attention of rows `start .. start+Sq-1` over keys `key_start .. start+Sq-1` (`k[:, :, t]` is
    position `key_start + t`), as `reference_attention` computes it: returns `[B, H, Sq, D]` in q's dtype.

    `chosen` (the dynamic part): bool `[B, H, nQd, nKd]` from `select_blocks` in blocks of `dyn_block`
    (a multiple of `block_n` and of `block_m`), or `[B, H, nKd]` from `select_blocks_one` when the rows
    lie in one such block. `window` / `softcap` as in the reference; `key_start > 0` needs a window no row
    reaches past. `full_heads` (bool `[H]`, the retrieval heads) see every causal key: computed here when
    the rows lie in one query block (`one_block`), else left at zero for the caller's dense attention.
    `by_mass` = (gamma, cap), for rows in one query block instead of `chosen`: the selection of their block by
    the exact-mass rule (`dynamic.mass_select`), from the scores the attention computes anyway.
    """
    B, H, Sq, D = q.shape
    scale = D**-0.5 if scale is None else scale
    assert block_n in (16, 32, 64) and masks.mask_words.shape[0] == H
    if chosen is not None:
        assert dyn_block % block_n == 0 and dyn_block % block_m == 0
        qd = start // dyn_block
        if chosen.dim() == 4 and one_block(start, Sq, block_m):
            chosen = chosen[:, :, qd]
        elif chosen.dim() == 3 and not one_block(start, Sq, block_m):  # placed at the rows' one block
            assert qd == (start + Sq - 1) // dyn_block, "a one-block selection needs rows in one block"
            placed = torch.zeros(B, H, qd + 1, chosen.shape[-1], dtype=torch.bool)
            placed[:, :, qd] = chosen
            chosen = placed
    full = None if full_heads is None or not bool(full_heads.any()) else full_heads.bool()
    out = torch.empty_like(q)
    with one_thread_when_busy():
        for b in range(B):
            sel = None if chosen is None else chosen[b]
            if one_block(start, Sq, block_m):
                o = _decode_one(q[b], k[b], v[b], masks, sel, full, dyn_block, start, key_start, scale, window,
                                softcap, block_m, block_n, by_mass)
            elif full is None or not bool(full.all()):
                o = _prefill_one(q[b], k[b], v[b], masks, full, sel, dyn_block, start, key_start, scale, window,
                                 softcap, block_m, block_n)
            else:  # every head is the caller's
                o = torch.zeros(H, Sq, D)
            out[b] = o.to(q.dtype)
    return out
