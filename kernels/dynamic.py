"""The dynamic part of DAM attention (beyond the paper, off by default): per query block, the
top-k key blocks by a cheap pooled q.k estimate, united with the static Stage-2 mask.

Blocks are aligned to absolute positions: query block `qb` holds positions
`[qb*B, (qb+1)*B)`, key block `kb` holds `[kb*B, (kb+1)*B)`. For the query rows present in a
call, the pooled query of a block is the mean of its present rows; the pooled key of a block is
the mean of its keys. Candidates are the blocks strictly before the query block (`kb < qb`, so
every pair in them is causal); the `k` best by score are selected (ties to the lower block
index), and a selected block allows all its pairs. The query's own block keeps the static mask
(with the diagonal guard). With `k` at least the number of earlier blocks, the result is the
static mask united with every earlier block.

Pure torch; the Triton kernels receive the selection as extra "full" blocks, the reference as
extra mask cells, so both compute exactly the same mask.
"""

from __future__ import annotations

import torch


def select_blocks(
    q: torch.Tensor,  # [B, H, Sq, D]
    k: torch.Tensor,  # [B, H_kv, Sk, D]
    start: int,
    topk: int,
    block: int,
) -> torch.Tensor:
    """Selected key blocks per query block: bool `[B, H, nQ, nK]` over absolute block indices.

    `topk` <= 0 selects nothing.

    `nQ = ceil((start + Sq) / block)`, `nK = ceil(Sk / block)`; query blocks with no row in this
    call select nothing.
    """
    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    G = H // H_kv
    nQ = -(-(start + Sq) // block)
    nK = -(-Sk // block)
    # Pooled keys: mean of each key block (the last one may be short).
    kf = k.float()
    pad = nK * block - Sk
    kp = torch.nn.functional.pad(kf, (0, 0, 0, pad)).reshape(B, H_kv, nK, block, D).sum(3)
    kcount = torch.full((nK,), float(block), device=k.device)
    kcount[-1] = block - pad
    kbar = kp / kcount[:, None]  # [B, H_kv, nK, D]
    # Pooled queries over the rows present in this call.
    pos = torch.arange(start, start + Sq, device=q.device)
    qb_of = pos // block  # [Sq]
    qsum = torch.zeros(B, H, nQ, D, device=q.device, dtype=torch.float32)
    qsum.index_add_(2, qb_of, q.float())
    qcount = torch.zeros(nQ, device=q.device, dtype=torch.float32).index_add_(0, qb_of, torch.ones(Sq, device=q.device))
    present = qcount > 0
    qbar = qsum / qcount.clamp(min=1)[:, None]
    scores = torch.matmul(qbar.reshape(B, H_kv, G, nQ, D), kbar.unsqueeze(2).transpose(-1, -2))
    scores = scores.reshape(B, H, nQ, nK)
    qi = torch.arange(nQ, device=q.device)[:, None]
    ki = torch.arange(nK, device=q.device)[None, :]
    causal = ki < qi
    scores = scores.masked_fill(~causal, float("-inf"))
    # Stable order: best score first, the lower block index first among equals.
    order = torch.sort(-scores, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nK, device=q.device).expand_as(order).contiguous())
    chosen = (rank < topk) & causal & present[:, None]
    return chosen


def dynamic_rows(chosen: torch.Tensor, rows: torch.Tensor, n_keys: int, block: int) -> torch.Tensor:
    """Cells allowed by the selected blocks for the given absolute rows: bool `[B, H, n, n_keys]`."""
    i = rows.to(chosen.device)[:, None]
    j = torch.arange(n_keys, device=chosen.device)[None, :]
    cells = chosen[:, :, (i // block).expand(-1, n_keys), (j // block).expand(len(rows), -1)]
    return cells & (j <= i)


def merge_layout(layout, chosen: torch.Tensor, block: int):
    """A BlockLayout whose full blocks also hold the selected ones (one batch row).

    chosen bool `[H, nQ, nKd]` in blocks of `block`; the layout's query blocks must be `block`
    rows and its key blocks must divide `block`. A selected block becomes full (all its pairs
    are causal and allowed) and leaves the partial list.
    """
    from .layout import BlockLayout, _compact

    BM, BN = layout.block_m, layout.block_n
    assert BM == block and block % BN == 0
    f = block // BN
    kept, full = layout.to_dense()  # [H, nQ, nK] on the layout's device
    H, nQ, nK = kept.shape
    dyn = chosen.to(kept.device).repeat_interleave(f, dim=-1)[..., :nK]
    dyn = torch.nn.functional.pad(dyn, (0, nK - dyn.shape[-1]))[:, :nQ]
    new_full = full | dyn
    new_part = kept & ~new_full
    cand = torch.arange(nK, device=kept.device).expand(nQ, nK)
    p_num, p_idx = _compact(new_part, cand)
    f_num, f_idx = _compact(new_full, cand)
    if p_idx.shape[-1] == 0:
        p_idx = torch.zeros(H, nQ, 1, dtype=torch.int64, device=kept.device)
    if f_idx.shape[-1] == 0:
        f_idx = torch.zeros(H, nQ, 1, dtype=torch.int64, device=kept.device)
    n_part, n_full = int(p_num.sum()), int(f_num.sum())
    i32 = torch.int32
    return BlockLayout(p_num.to(i32).contiguous(), p_idx.to(i32).contiguous(), f_num.to(i32).contiguous(),
                       f_idx.to(i32).contiguous(), layout.length, BM, BN, n_part / max(1, n_part + n_full))
