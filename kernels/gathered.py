"""Block-sparse DAM attention on the CPU in PyTorch: softmax over the gathered kept key blocks.

The CPU peer of the Triton prefill kernel (`prefill.py`), exact like the reference (`reference.py`).
Query rows are cut into blocks of `block_m`, keys into blocks of `block_n` (16, 32 or 64: one
64-bit word holds a row's mask bits of a key block). The Stage-2 mask is read from the word tables
the kernels read (`word_tables.DeviceMasks`, as `prefill.dam_tile_mask` does), causal rule and diagonal
guard included; the blocks holding an allowed pair come from length-independent block summaries of
those tables (`BlockTables`, in `block_words.py` with the words themselves), so nothing of size `S x S` is
ever built.

An item is (kv head, query block): the rows of its grouped query heads stacked over the union of
their block lists (kept static blocks and selected blocks), key and value blocks gathered once per
item (never a copy per query head), each row under its own head's words, expanded into an additive
mask by a lookup table of 16-bit parts. Heads the caller computes densely (retrieval heads) are left
out of the items. Items of similar length and equal row count run in groups through torch's CPU flash
attention in float32 (soft-capping: matmul, `tanh`, softmax). Everything that does not depend on the keys
(the query rows of every item in output order, one gather from q; the key block indices; the row-independent
terms of the words; where each output row goes) is computed once per call, so a group costs a handful of tensor
calls: with two threads each call also pays a fork and join, and a 2K prefill runs about 750 groups. One
concatenation and one row gather put the groups' outputs in `[S, H, D]` order (the layout the model reads
next: a prefill's result is a transposed view of it). A call whose rows lie in one query block (a decode step)
reads every key under its rows' mask instead: no lists to build.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch

from .block_words import (
    beyond_terms,
    beyond_words,
    block_ids,
    block_tables,
    block_word,
    kept_blocks,
    list_words,
    ones_below,
    window_bits,
)
from .dynamic import mass_scores, mass_select, reach_start, scores_block_mass

# Elements (rows x gathered keys) of one group's scores: big enough to keep torch's per-call cost
# small, small enough that its mask, keys and values stay in the caches (4 MiB each here).
GROUP_ELEMENTS = 1 << 20
_LUT: list = []  # float32 [65536, 16]: bit u of a 16-bit value -> 0.0 (allowed) or -inf (masked) in column u


def mask_lut() -> torch.Tensor:
    """The lookup table of `additive_mask` (made once per process)."""
    if not _LUT:
        with torch.inference_mode(False):
            bits = (torch.arange(1 << 16, dtype=torch.int32)[:, None] >> torch.arange(16, dtype=torch.int32)) & 1
            _LUT.append(torch.zeros(1 << 16, 16).masked_fill_(bits == 0, float("-inf")))
    return _LUT[0]


def additive_mask(words: torch.Tensor, block_n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """int64 words `[..., P]` (bit t: key t of the block allowed) -> float32 `[..., P * block_n]`
    of 0.0 / -inf, key blocks side by side (little-endian: 16-bit part u holds keys 16u .. 16u+15, one row of a
    4 MiB table each; masks hold few distinct parts, so the rows read stay in the caches).
    `out`: a float32 buffer of at least that many elements to write into."""
    part = words.contiguous().view(torch.int16).view(*words.shape, 4)[..., : block_n // 16]
    idx = part.reshape(-1).int().bitwise_and_(0xFFFF)
    dst = None if out is None else out[: idx.numel() * 16].view(idx.numel(), 16)
    res = torch.index_select(mask_lut(), 0, idx, out=dst)
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


_THREADS = threading.local()


BUSY_RECHECK_S = 1.0  # how long one reading of the load stands: a decode step calls every layer within it
_BUSY: list = [float("-inf"), False]  # the time of the last reading, its answer


def _busy() -> bool:
    """Other work on the cores (`_load_busy`), read at most once every `BUSY_RECHECK_S` seconds: a decode step's 30
    calls would otherwise read `/proc/loadavg` 30 times, more than the step's attention costs at short lengths."""
    now = time.monotonic()
    if now - _BUSY[0] >= BUSY_RECHECK_S:
        _BUSY[0], _BUSY[1] = now, _load_busy()
    return _BUSY[1]


def _load_busy() -> bool:
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
    """One batch row of a multi-block call: q read in place (rows gathered per group), padded float32 copies of
    k and v (keys in whole blocks), the outputs of the groups side by side in one buffer, put in place at the end."""

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
        # q's rows as `[n, D]` without a copy where its layout allows: `[S, H, D]` (transformers' projections,
        # transposed) or `[H, S, D]`; row of (head h, position p): p * sp + h * sh.
        qf = q.float()
        if qf.transpose(0, 1).is_contiguous():
            self.q_rows, self.sp, self.sh = qf.transpose(0, 1).reshape(-1, D), H, 1
        else:
            self.q_rows, self.sp, self.sh = qf.contiguous().view(-1, D), 1, Sq
        self.kp = _padded(k, self.kb_first * bn, self.nKs * bn, key_start).view(-1, bn * D)
        self.vp = _padded(v, self.kb_first * bn, self.nKs * bn, key_start).view(-1, bn * D)
        self.outs: list[torch.Tensor] = []  # the groups' outputs, in order; then a zero row
        self.where = torch.zeros(Sq * H + 1, dtype=torch.int64)  # (p, h) -> row of the outputs (+ the dummy)

    def run(self, g_i: torch.Tensor, qb_i: torch.Tensor, ids: torch.Tensor, count: torch.Tensor, dyn,
            heads: torch.Tensor, n_heads: torch.Tensor):
        """Items (kv head `g_i`, query block `qb_i`) over their block lists `ids` (`count` long), in groups of
        at most `GROUP_ELEMENTS` scores of equal row count, longest lists first; `heads` `[H_kv, G]`: the query
        heads computed of each kv head (`n_heads` of them, first); `dyn` `[H, nq, nK]`: each head's selected
        blocks. What does not depend on the keys (indices, row-independent word terms, where each output row
        goes) is computed once for all items; a group then costs a few tensor calls (`_group`)."""
        gc_i = n_heads[g_i]
        keep = (count > 0) & (gc_i > 0)
        order = torch.argsort(gc_i * (count.max() + 1) + count, descending=True, stable=True)
        order = order[: int(keep.sum())]
        if len(order) == 0:
            return
        cnt, gcs = count[order].tolist(), gc_i[order].tolist()
        groups, i, used = [], 0, 0
        while i < len(cnt):
            P, Gc = cnt[i], gcs[i]
            n = max(1, min(len(cnt) - i, GROUP_ELEMENTS // (Gc * self.bm * P * self.bn)))
            while gcs[i + n - 1] != Gc:  # one row count per group
                n -= 1
            groups.append((i, n, P, Gc, used))
            used += n * Gc * self.bm
            i += n
        self._items(g_i[order], qb_i[order], ids[order, : max(cnt)], count[order], gc_i[order], dyn, heads)
        beyond = (qb_i[order] * self.bm >= self.masks.pcl).tolist()
        for a, n, P, Gc, used in groups:
            self._group(a, n, P, Gc, used, all(beyond[a: a + n]))

    def _items(self, g, qb, ids, cnt, gc, dyn, heads):
        """The per-item tables of the sorted items: heads `[N, G]`, rows, q and key block indices, the word terms
        of items beyond L (selected blocks whole), and each computed row's place in the output."""
        bm, bn, H, Sq = self.bm, self.bn, self.H, self.Sq
        N, Pm = ids.shape
        r = torch.arange(bm)
        self.hs, self.q0, self.ids = heads[g], qb * bm, ids  # [N, G], [N], [N, Pm]
        self.slot_ok = torch.arange(Pm) < cnt[:, None]
        self.whole = None
        if dyn is not None:  # a head's selected blocks are whole
            chosen = dyn[self.hs, (qb - self.qb_first)[:, None]]  # [N, G, nK]
            self.whole = chosen.gather(2, ids[:, None, :].expand(N, self.G, Pm)) & self.slot_ok[:, None, :]
        self.d = self.cw = None
        if bool((self.q0 >= self.masks.pcl).any()):
            self.d, self.cw = beyond_terms(self.tab, self.hs, self.q0[:, None], ids[:, None, :],
                                           self.slot_ok[:, None, :], bn)
            if self.whole is not None:
                self.cw = torch.where(self.whole, block_word(bn), self.cw)
        pos = self.q0[:, None] + r - self.start  # [N, bm], positions in the call
        inside = (pos >= 0) & (pos < Sq)
        pos = pos.clamp_(0, Sq - 1)
        self.qi = pos[:, None, :] * self.sp + (self.hs * self.sh)[:, :, None]  # [N, G, bm]: rows of q_rows
        self.blk = g[:, None] * self.nKs + (ids - self.kb_first).clamp(min=0)  # [N, Pm]: blocks of kp, vp
        sizes = gc * bm
        j = torch.arange(self.G)
        row = (torch.cumsum(sizes, 0) - sizes)[:, None, None] + j[:, None] * bm + r  # [N, G, bm]: output rows
        heads_in = (j < gc[:, None])[:, :, None].expand(N, self.G, bm)
        self.where.fill_(int(sizes.sum()))  # the zero row after the outputs
        dst = torch.where(heads_in & inside[:, None, :], pos[:, None, :] * H + self.hs[:, :, None], Sq * H)
        self.where[dst.view(-1)] = row.view(-1)  # each (position, head) once; the rest to the dummy slot
        # every computed query row, in output order: one gather, each group reads its rows in place
        self.q_all = torch.index_select(self.q_rows, 0, self.qi[heads_in])

    def _group(self, a: int, n: int, P: int, Gc: int, used: int, beyond: bool):
        """One group: sorted items `a .. a+n-1`, `P` key blocks, `Gc` query heads each; output rows from `used`."""
        bm, bn, D = self.bm, self.bn, self.D
        it = slice(a, a + n)
        if beyond:  # rows at or beyond L: offset words and columns, selected blocks folded into the columns
            words = beyond_words(self.tab, self.d[it, :, :P], self.hs[it, :Gc], self.cw[it, :Gc, :P], bm, bn)
            words = words.view(n * Gc, bm, P)
        else:
            h, q0, hid, slot_ok = self._expanded(it, P, Gc)
            words = list_words(self.masks, self.tab, h, q0, hid, slot_ok, bm, bn)
            if self.whole is not None:
                words = torch.where(self.whole[it, :Gc, :P].reshape(-1, 1, P), block_word(bn), words)
        if self.window is not None:
            _, q0, hid, _ = self._expanded(it, P, Gc)
            words &= window_bits(q0[:, None, None] + torch.arange(bm)[:, None], hid[:, None, :], bn, self.window)
        R = n * Gc * bm
        qg = self.q_all[used: used + R]
        blk = self.blk[it, :P].reshape(-1)
        kg = torch.index_select(self.kp, 0, blk, out=scratch("k", n * P * bn * D).view(n * P, bn * D))
        vg = torch.index_select(self.vp, 0, blk, out=scratch("v", n * P * bn * D).view(n * P, bn * D))
        mask = additive_mask(words, bn, scratch("mask", R * P * bn)).view(n, 1, Gc * bm, P * bn)
        o = _attend(qg.view(n, 1, Gc * bm, D), kg.view(n, 1, P * bn, D), vg.view(n, 1, P * bn, D), mask,
                    self.scale, self.softcap)
        self.outs.append(o.view(R, D))

    def _expanded(self, it: slice, P: int, Gc: int):
        """Per (item, head) rows of a group: heads, first rows, block ids and slot flags."""
        return (self.hs[it, :Gc].reshape(-1), self.q0[it].repeat_interleave(Gc),
                self.ids[it, :P].repeat_interleave(Gc, dim=0), self.slot_ok[it, :P].repeat_interleave(Gc, dim=0))

    def result(self) -> torch.Tensor:
        """`[H, Sq, D]` (a view of `[Sq, H, D]`), rows of heads not computed zero."""
        out = torch.index_select(torch.cat([*self.outs, torch.zeros(1, self.D)]), 0, self.where[:-1])
        return out.view(self.Sq, self.H, self.D).transpose(0, 1)


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
    # The computed heads of each kv head, first (a retrieval head's rows are the caller's: left out, zero here).
    comp = computed.view(H_kv, run.G)
    heads = torch.argsort((~comp).to(torch.int8), dim=1, stable=True) + torch.arange(H_kv)[:, None] * run.G
    run.run(torch.arange(H_kv).repeat_interleave(len(qb)), qb.repeat(H_kv), *block_ids(union), dyn, heads,
            comp.sum(1))
    return run.result()


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
    cut = max(reach_start(start, window, dyn_block or bn), key_start)  # keys before it: outside every window
    if cut > key_start:
        k, v, key_start = k[:, cut - key_start:], v[:, cut - key_start:], cut
    H_kv, Sk = k.shape[0], k.shape[1]
    s = mass_scores(q[None], k[None], scale)  # [1, H_kv, G * Sq, Sk], as tail_block_mass_reference computes them
    if by_mass is not None:  # blocks by absolute position: a cache cut inside a block has no keys before the cut
        lead = cut % dyn_block
        sm = torch.nn.functional.pad(s, (lead, 0), value=float("-inf")) if lead else s.clone()
        mass = scores_block_mass(sm, start - cut + lead, dyn_block, Sq, window).reshape(H, -1)
        mass = torch.nn.functional.pad(mass, ((cut - lead) // dyn_block, 0))
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
        words = torch.where(full[:, None, None], ones_below((rows - kb * bn + 1).clamp(0, bn)), words)
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
    masks,  # word_tables.DeviceMasks of this layer, on the CPU
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
    outs = []
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
            outs.append(o.to(q.dtype))
    if B == 1:  # no copy: a prefill's rows come as a view of `[Sq, H, D]`, the layout the model reads next
        return outs[0][None]
    return torch.stack(outs)
