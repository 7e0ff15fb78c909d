"""Triton kernel: `dynamic.merge_layout` (its PyTorch reference) in one launch, with no host synchronisation.

The prefill's dynamic part joins each (head, query block)'s selected key blocks to the layer's static layout as
full blocks. The reference does it on index lists in about thirty torch operations and five reads of device
values by the host (the lists' widths, the partial share): 0.9-1.7 ms a layer at 32,768 tokens on two H100s, mostly
launches and waits, where this kernel takes 0.1 ms (docs/results/benchmarks.md, the merge in one launch). Here one
program per (head, query block) row:

1. clears its row of a byte scratch (one byte per layout key block), then marks its static full blocks (2) and
   partial blocks (4) in it;
2. sweeps the row's key blocks in tiles: a block is full if it was full or its selection block is selected, partial
   if it was partial and is not selected; each list is compacted by a prefix sum, so it comes out ascending;
3. pads both lists with 0 past their counts.

The output's widths are bounds known on the host: the partial list keeps the static width (it only shrinks), the
full list gets the static width plus `max_selected` selection blocks (`f` layout blocks each), at most every key
block. A row holding more than `max_selected` selected blocks would not fit: the kernel counts such rows in
`overflow` (a device tensor the caller may read; the dynamic part's rules never select more than their cap).
The partial share is left unknown (None): the prefill kernel reads it only for query blocks of 128 rows or more,
and the dynamic part's are its selection blocks of 64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 1024  # key blocks a sweep step covers
LIST_TILE = 128  # list entries a step of the scatter and the padding covers


@triton.jit
def _mark(scr, IDX, n, W, row, code: tl.constexpr, LIST_TILE: tl.constexpr):
    """scr[IDX[row, i]] = code for the row's first `n` list entries (of a list `W` wide)."""
    offs_l = tl.arange(0, LIST_TILE)
    for i0 in range(0, W, LIST_TILE):
        i = i0 + offs_l
        ok = i < n
        idx = tl.load(IDX + row * W + i, mask=ok, other=0)
        tl.store(scr + idx, tl.full([LIST_TILE], code, tl.uint8), mask=ok)


@triton.jit
def _zero_past(OUT, n, W, row, LIST_TILE: tl.constexpr):
    """OUT[row, i] = 0 for n <= i < W: a list's padding."""
    offs_l = tl.arange(0, LIST_TILE)
    for i0 in range(0, W, LIST_TILE):
        i = i0 + offs_l
        tl.store(OUT + row * W + i, tl.zeros([LIST_TILE], dtype=tl.int32), mask=(i >= n) & (i < W))


@triton.jit(do_not_specialize=["nQ", "nQc", "nKd", "nK", "WP", "WF", "WFO", "F"])
def _merge_kernel(
    PN, PI, FN, FI,  # the static layout: [R] i32, [R, WP] i32, [R] i32, [R, WF] i32 (R = H * nQ, contiguous)
    CH,  # the selection: [H, nQc, nKd] u8 contiguous
    SCR,  # scratch: [R, nK] u8
    OPN, OPI, OFN, OFI, OVF,  # out: [R] i32, [R, WP] i32, [R] i32, [R, WFO] i32; [1] i32 rows that overflowed
    nQ, nQc, nKd, nK, WP, WF, WFO, F,
    TILE: tl.constexpr, LIST_TILE: tl.constexpr, COUNT_OVERFLOW: tl.constexpr,
):
    r = tl.program_id(0)
    h = r // nQ
    qb = r % nQ
    row = r.to(tl.int64)
    scr = SCR + row * nK
    offs = tl.arange(0, TILE)
    for j0 in range(0, nK, TILE):
        tl.store(scr + j0 + offs, tl.zeros([TILE], dtype=tl.uint8), mask=j0 + offs < nK)
    tl.debug_barrier()
    _mark(scr, FI, tl.load(FN + r), WF, row, 2, LIST_TILE)
    _mark(scr, PI, tl.load(PN + r), WP, row, 4, LIST_TILE)
    tl.debug_barrier()

    ch = CH + (h.to(tl.int64) * nQc + qb) * nKd
    nf_out = tl.zeros([1], dtype=tl.int32)
    np_out = tl.zeros([1], dtype=tl.int32)
    for j0 in range(0, nK, TILE):
        j = j0 + offs
        inb = j < nK
        code = tl.load(scr + j, mask=inb, other=0)
        c = j // F
        row_ok = c * 0 + qb < nQc  # a tensor: the interpreter refuses a scalar term in a mask
        sel = tl.load(ch + c, mask=inb & (c < nKd) & row_ok, other=0) != 0
        full = inb & (((code & 2) != 0) | sel)
        part = inb & ((code & 4) != 0) & (~sel)
        full_i = full.to(tl.int32)
        part_i = part.to(tl.int32)
        fpos = tl.cumsum(full_i, 0) - 1 + tl.sum(nf_out, 0)
        ppos = tl.cumsum(part_i, 0) - 1 + tl.sum(np_out, 0)
        tl.store(OFI + row * WFO + fpos, j, mask=full & (fpos < WFO))
        tl.store(OPI + row * WP + ppos, j, mask=part & (ppos < WP))
        nf_out += tl.sum(full_i, 0)
        np_out += tl.sum(part_i, 0)
    _zero_past(OFI, tl.sum(nf_out, 0), WFO, row, LIST_TILE)
    _zero_past(OPI, tl.sum(np_out, 0), WP, row, LIST_TILE)
    one = tl.arange(0, 1)
    tl.store(OFN + r + one, tl.minimum(nf_out, WFO))
    tl.store(OPN + r + one, np_out)
    if COUNT_OVERFLOW:  # masked: no atomic where none overflows
        tl.atomic_add(OVF + one, tl.full([1], 1, tl.int32), mask=nf_out > WFO)


def merge_layout(layout, chosen: torch.Tensor, block: int, max_selected: int, overflow: torch.Tensor | None = None,
                 tile: int = TILE, list_tile: int = LIST_TILE):
    """`dynamic.merge_layout(layout, chosen, block)` in one launch (module doc): the same lists in the same order
    and the same counts, lists padded to bounds instead of to their longest row, `partial_share` None.

    `max_selected`: the most selected blocks a row of `chosen` (bool `[H, nQc, nKd]`) holds. `overflow` (an int32
    tensor of one element on the layout's device, optional): the rows that held more are added to it. `tile`,
    `list_tile` (powers of 2): the key blocks and list entries a step covers (small ones test the steps' seams)."""
    from .layout import BlockLayout

    BM, BN = layout.block_m, layout.block_n
    assert BM == block and block % BN == 0 and max_selected >= 0
    f = block // BN
    H, nQ = layout.kv_num_blocks.shape
    nK = layout.n_kv_blocks
    dev = layout.kv_indices.device
    ch = chosen.to(dev)
    assert ch.dim() == 3 and ch.shape[0] == H, f"chosen must be [H={H}, nQ, nK], got {tuple(ch.shape)}"
    ch = ch.contiguous().view(torch.uint8) if ch.dtype == torch.bool else (ch != 0).to(torch.uint8).contiguous()
    wp, wf = layout.kv_indices.shape[-1], layout.full_kv_indices.shape[-1]
    wfo = max(1, min(nK, wf + max_selected * f))
    i32 = torch.int32
    pn, pi = layout.kv_num_blocks.to(i32).contiguous(), layout.kv_indices.to(i32).contiguous()
    fn, fi = layout.full_kv_num_blocks.to(i32).contiguous(), layout.full_kv_indices.to(i32).contiguous()
    opn, ofn = torch.empty(H, nQ, dtype=i32, device=dev), torch.empty(H, nQ, dtype=i32, device=dev)
    opi, ofi = torch.empty(H, nQ, wp, dtype=i32, device=dev), torch.empty(H, nQ, wfo, dtype=i32, device=dev)
    if H * nQ:
        scratch = torch.empty(H * nQ, max(1, nK), dtype=torch.uint8, device=dev)
        _merge_kernel[(H * nQ,)](
            pn, pi, fn, fi, ch, scratch, opn, opi, ofn, ofi, opn if overflow is None else overflow,
            nQ, ch.shape[1], ch.shape[2], nK, wp, wf, wfo, f,
            TILE=tile, LIST_TILE=list_tile, COUNT_OVERFLOW=overflow is not None, num_warps=4,
        )
    return BlockLayout(opn, opi, ofn, ofi, layout.length, BM, BN, None)
