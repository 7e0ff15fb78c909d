"""Block selections by estimated attention mass, with budgets that adapt per head and per input.

Two estimates of how much softmax attention each (query block, key block) pair carries, and the rules that
keep the heaviest pairs until a share `gamma` of it is kept. Both return `chosen` as
`dam_kernels.dynamic.select_blocks` does: bool `[B, H, nQ, nK]` over absolute blocks of `block` positions,
only blocks strictly before their query block, query blocks with no row in the call selecting nothing.

- `antidiag_select` (XAttention, Xu et al. 2025): each row scores only the keys on the antidiagonals of its
  tiles, one key in `stride` (row r reads key c where `(r + c) % stride == stride - 1`, so every row reads the
  same number of keys of every earlier block and each tile is sampled at 1/stride of its pairs, a cost of
  1/stride of full q.k). Each row's softmax over its sampled causal keys is summed per key block and
  averaged over the block's rows (the exact mass of `dam_kernels.dynamic.tail_block_mass`, on a 1/stride
  sample; `stride=1` is that exact mass). Per query block, `cumulative_select`: the own block counts as kept,
  then earlier blocks by decreasing estimate until `gamma` of the mass is kept, at most `cap`.
- `flex_select` (FlexPrefill's query-aware pattern, Lai et al. 2025): every query block's mean query against
  every key block's mean key (scaled as the attention is), softmax per query block over its causal blocks
  (own included); then `global_select`: per head, over all query blocks at once, the heaviest (query block,
  key block) pairs until `gamma` of the head's total mass is kept (own blocks counted as kept), at most `cap`
  per query block. The budget moves to the query blocks whose estimate is spread out.

With `tail_mass`, the call's last query block is not estimated but chosen by the exact-mass rule of
`select_blocks` (`tail_block_mass` then `mass_select`, at most `tail_cap`), as the shipped selection does.
Pure torch; on CUDA `antidiag_select` and `antisum_select` take their estimates from `dam_kernels.antidiag` and
`dam_kernels.antisum` (Triton, the same numbers up to rounding), where the torch estimate's float32 scores would
cost more than the attention saved, and `cumulative_select` from `dam_kernels.select_rows` (Triton, no sort; the
same blocks up to rounding). On the CPU `antisum_select` takes the compiled estimate of `dam_kernels.cpu_sparse`
where the machine built it (C, the same numbers up to rounding, a third of the torch estimate's time at 2K).
"""

from __future__ import annotations

import functools

import torch

from .dynamic import mass_select, tail_block_mass

# float32 scores of the antidiagonal sample held at once: on the CPU 16 MiB, small enough to stay near the
# caches; on a GPU 512 MiB, so that a 131K prompt takes a few hundred chunks, not thousands of launches.
ANTIDIAG_CHUNK_ELEMENTS = {"cpu": 1 << 22, "gpu": 1 << 27}


def _check(block: int, gamma: float, cap: int, stride: int = 1) -> None:
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma {gamma} must lie in (0, 1]: the share of the attention mass to keep")
    if cap < 0:
        raise ValueError(f"cap {cap} must be >= 0: the most key blocks a query block may add")
    if stride < 1 or block % stride:
        raise ValueError(f"stride {stride} must be >= 1 and divide the block size {block}")


def antidiag_blocks(q: torch.Tensor, k: torch.Tensor, start: int, block: int, stride: int,
                    scale: float | None) -> tuple[int, int, int, float]:
    """The antidiagonal estimate's blocks, checked: (first query block, query blocks, key blocks, scale), for
    `antidiag_block_mass` and its Triton kernel alike."""
    Sq, D, Sk = q.shape[2], q.shape[3], k.shape[2]
    if Sk < start + Sq:
        raise ValueError(f"{Sk} keys cannot cover rows up to position {start + Sq - 1}")
    if block % stride:
        raise ValueError(f"stride {stride} must divide the block size {block}")
    return start // block, -(-(start + Sq) // block), -(-Sk // block), D**-0.5 if scale is None else scale


# Query blocks a chunk of `_query_block_chunks` may always hold: below it, each chunk's fixed cost (a dozen tensor
# calls) outweighs the scores past the diagonal it saves (a 2K prefill's selection on the CPU: 30% less time).
MIN_CHUNK_BLOCKS = 8


def _query_block_chunks(qb0: int, nQ: int, elements, limit: int):
    """Chunks (c0, c1) of the call's query blocks (local indices, `qb0` the first absolute one), each scored against
    the key blocks up to its last one (later keys are never causal): at most a quarter as many query blocks as keys
    before them (or `MIN_CHUNK_BLOCKS`), so that at most about an eighth of the scores computed lie past the
    diagonal beyond the first blocks, and at most `limit` scores (`elements(c0, c1)`) at once."""
    c0 = 0
    while c0 < nQ - qb0:
        c1 = c0 + 1
        while (c1 < nQ - qb0 and c1 + 1 - c0 <= max((qb0 + c0) // 4, MIN_CHUNK_BLOCKS)
               and elements(c0, c1 + 1) <= limit):
            c1 += 1
        yield c0, c1
        c0 = c1


def group_presence(start: int, Sq: int, qb0: int, nQ: int, block: int, stride: int, device,
                   row_step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Row groups of `stride` rows from query block `qb0` on: bool `[n_groups]`, whether the group holds a row of
    the call (`start .. start + Sq - 1`) and is estimated, and float32 `[nQ - qb0]`, such groups per query block
    (at least 1). `row_step` > 1 estimates one row group in `row_step` of each query block (the last of each run;
    at most the block's group count; a block none of whose sampled groups holds a row of the call keeps all its
    present groups)."""
    R = block // stride
    row_step = min(row_step, R)
    gpos = qb0 * block + torch.arange((nQ - qb0) * R, device=device) * stride  # first rows
    present = (gpos + stride > start) & (gpos < start + Sq)
    if row_step > 1:
        per_block = present.view(nQ - qb0, R)
        sampled = per_block & (torch.arange(R, device=device) % row_step == row_step - 1)
        present = torch.where(sampled.any(1, keepdim=True), sampled, per_block).reshape(-1)
    return present, present.view(nQ - qb0, R).sum(1).clamp(min=1).float()


def antidiag_block_mass(q: torch.Tensor, k: torch.Tensor, start: int, block: int, stride: int = 8,
                        scale: float | None = None) -> torch.Tensor:
    """Estimated attention mass per (query block, key block) from the antidiagonal sample: float32
    `[B, H, nQ, nK]`, each present query block's row summing to 1 (module doc).

    q `[B, H, Sq, D]` at positions `start .. start + Sq - 1`, k `[B, H_kv, Sk, D]` with `Sk >= start + Sq`;
    `nQ = ceil((start + Sq) / block)`, `nK = ceil(Sk / block)`. Rows with no sampled causal key are left out
    of their block's average; a block with none is all zeros. `scale` defaults to `D ** -0.5`.
    """
    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    G, s = H // H_kv, stride
    qb0, nQ, nK, scale = antidiag_blocks(q, k, start, block, stride, scale)
    base = qb0 * block  # the first row position of the padded rows, a multiple of block (and of s)
    nR, bs = (nQ - qb0) * block, block // s
    qp = torch.zeros(B, H, nR, D, dtype=torch.float32, device=q.device)
    qp[:, :, start - base: start - base + Sq] = q.float() * scale
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, nK * block - Sk))
    # Row i*s + rho of the padded rows reads keys j*s + (s - 1 - rho): residue rho of the rows against the
    # mirrored residue of the keys, one batched product per residue; the G query heads of a kv head stacked.
    qr = qp.reshape(B, H_kv, G, nR // s, s, D).permute(0, 1, 4, 2, 3, 5)  # [B, H_kv, s, G, nR/s, D]
    kr = kp.reshape(B, H_kv, nK * bs, s, D).transpose(2, 3).flip(2).contiguous()  # [B, H_kv, s, nK*bs, D]
    rho = torch.arange(s, device=q.device)[:, None, None]
    out = torch.zeros(B, H, nQ, nK, dtype=torch.float32, device=q.device)
    limit = ANTIDIAG_CHUNK_ELEMENTS["cpu" if q.device.type == "cpu" else "gpu"]
    for c0, c1 in _query_block_chunks(qb0, nQ, lambda a, b: B * H * block * (qb0 + b) * bs * (b - a), limit):
        nKc = min(nK, qb0 + c1)
        i = torch.arange(c0 * bs, c1 * bs, device=q.device)
        rpos = base + i[None, :, None] * s + rho  # [s, n, 1]
        kpos = torch.arange(nKc * bs, device=q.device)[None, None, :] * s + (s - 1 - rho)  # [s, 1, nKc*bs]
        valid = (kpos <= rpos) & (kpos < Sk) & (rpos >= start) & (rpos < start + Sq)  # [s, n, nKc*bs]
        n = (c1 - c0) * bs
        # keys in the order (sample t of a block, block): a block's sum adds bs contiguous runs of nKc
        kc = kr[..., : nKc * bs, :].view(B, H_kv, s, nKc, bs, D).transpose(3, 4).reshape(B, H_kv, s, bs * nKc, D)
        e = torch.matmul(qr[..., c0 * bs: c1 * bs, :].reshape(B, H_kv, s, G * n, D),
                         kc.transpose(-1, -2)).view(B, H_kv, s, G, n, bs * nKc)
        ok = valid.view(s, n, nKc, bs).transpose(2, 3).reshape(s, 1, n, bs * nKc)
        p = torch.softmax(e.masked_fill_(~ok, float("-inf")), dim=-1)
        p = p.view(*p.shape[:-1], bs, nKc).sum(-2)  # per row and key block: [B, H_kv, s, G, n, nKc]
        p = torch.where(valid.any(-1)[:, None, :, None], p, 0.0)  # a row without a sampled key (NaN): none
        per_key_block = p.view(B, H_kv, s, G, c1 - c0, bs, nKc).sum(dim=(2, 5))  # [B, H_kv, G, c, nKc]
        rows = valid.any(-1).reshape(s, c1 - c0, bs).sum(dim=(0, 2)).clamp(min=1)  # rows averaged per block
        out[:, :, qb0 + c0: qb0 + c1, :nKc] = (per_key_block / rows[:, None]).reshape(B, H, c1 - c0, nKc)
    return out


def antisum_block_mass(q: torch.Tensor, k: torch.Tensor, start: int, block: int, stride: int = 8,
                       scale: float | None = None, row_step: int = 1) -> torch.Tensor:
    """XAttention's own estimate (module doc, `antisum_select`): float32 `[B, H, nQ, nK]`, each present query
    block's row summing to 1. Shapes and `scale` as in `antidiag_block_mass`.

    Rows and keys in groups of `stride` at absolute positions (group i: rows `i s .. i s + s - 1`); a row
    group's score against key group j is the mean over t of `scale q[i s + t] . k[j s + s - 1 - t]` (the
    antidiagonal of their `s x s` tile: one product of `s D`-long vectors, rows of the group outside the call
    read as zeros), softmaxed over the key groups `j <= i` (the diagonal tile whole, as XAttention does), summed
    per key block and averaged over the query block's row groups that hold a row of the call (with `row_step`, one
    in `row_step` of them: `group_presence`)."""
    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    G, s = H // H_kv, stride
    qb0, nQ, nK, scale = antidiag_blocks(q, k, start, block, stride, scale)
    base = qb0 * block
    nR, bs = (nQ - qb0) * block, block // s
    qp = torch.zeros(B, H, nR, D, dtype=torch.float32, device=q.device)
    qp[:, :, start - base: start - base + Sq] = q
    qr = qp.view(B, H_kv, G, nR // s, s * D)  # a row group: its s rows side by side
    # a key group: its s keys last first, side by side (sum_t q[i s + t] . k[j s + s-1-t], the antidiagonal)
    last_first = torch.arange(s - 1, -1, -1, device=q.device)
    kp = torch.nn.functional.pad(k.float() * (scale / s), (0, 0, 0, nK * block - Sk))
    kr = kp.view(B, H_kv, nK * bs, s, D)[:, :, :, last_first].reshape(B, H_kv, nK * bs, s * D)
    present, groups = group_presence(start, Sq, qb0, nQ, block, s, q.device, row_step)
    out = torch.zeros(B, H, nQ, nK, dtype=torch.float32, device=q.device)
    limit = ANTIDIAG_CHUNK_ELEMENTS["cpu" if q.device.type == "cpu" else "gpu"]
    for c0, c1 in _query_block_chunks(qb0, nQ, lambda a, b: B * H * bs * (b - a) * (qb0 + b) * bs, limit):
        nKc = min(nK, qb0 + c1)
        gi = torch.arange(c0 * bs, c1 * bs, device=q.device)
        gi = gi[present[gi]]  # the local row groups estimated: holding a row of the call (and sampled)
        n = len(gi)
        e = torch.matmul(qr[:, :, :, gi].reshape(B, H_kv, G * n, s * D),
                         kr[:, :, : nKc * bs].transpose(-1, -2)).view(B, H_kv, G, n, nKc * bs)
        kj = torch.arange(nKc * bs, device=q.device)
        ok = (kj[None, :] <= base // s + gi[:, None]) & (kj[None, :] * s < Sk)  # [n, nKc*bs]: key groups j <= i
        p = torch.softmax(e.masked_fill_(~ok, float("-inf")), dim=-1)
        p = p.view(B, H_kv, G, n, nKc, bs).sum(-1)  # per row group and key block: [B, H_kv, G, n, nKc]
        p = torch.zeros(B, H_kv, G, c1 - c0, nKc, device=q.device).index_add_(3, gi // bs - c0, p)  # per query block
        out[:, :, qb0 + c0: qb0 + c1, :nKc] = (p / groups[c0:c1, None]).reshape(B, H, c1 - c0, nKc)
    return out


def antidiag_pairs(start: int, Sq: int, stride: int) -> int:
    """The (row, key) products `antidiag_block_mass` needs for rows `start .. start + Sq - 1` per head: the
    causal keys c <= r with `(r + c) % stride == stride - 1`, summed over the rows."""
    r = torch.arange(start, start + Sq, dtype=torch.int64)
    c0 = (stride - 1 - r) % stride  # the row's first sampled key
    return int(torch.where(c0 <= r, (r - c0) // stride + 1, torch.zeros_like(r)).sum())


def pooled_block_mass(q: torch.Tensor, k: torch.Tensor, start: int, block: int,
                      scale: float | None = None) -> torch.Tensor:
    """FlexPrefill's query-aware estimate: float32 `[B, H, nQ, nK]`, per present query block the softmax of
    `scale` (mean of its present rows) . (mean key of each block) over key blocks `kb <= qb`; query blocks
    with no row in the call are zeros. Shapes and `scale` as in `antidiag_block_mass`."""
    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = D**-0.5 if scale is None else scale
    nQ, nK = -(-(start + Sq) // block), -(-Sk // block)
    qb_of = torch.arange(start, start + Sq, device=q.device) // block
    qsum = torch.zeros(B, H, nQ, D, dtype=torch.float32, device=q.device).index_add_(2, qb_of, q.float())
    qcount = torch.zeros(nQ, device=q.device).index_add_(0, qb_of, torch.ones(Sq, device=q.device))
    kcount = torch.clamp(Sk - torch.arange(nK, device=q.device) * block, max=block).float()
    kbar = torch.nn.functional.pad(k.float(), (0, 0, 0, nK * block - Sk)).reshape(B, H_kv, nK, block, D).sum(3)
    kbar = kbar / kcount[:, None]
    qbar = qsum / qcount.clamp(min=1)[:, None]
    sc = torch.matmul(qbar.reshape(B, H_kv, G, nQ, D), kbar.unsqueeze(2).transpose(-1, -2)) * scale
    causal = torch.arange(nK, device=q.device)[None, :] <= torch.arange(nQ, device=q.device)[:, None]
    p = torch.softmax(sc.reshape(B, H, nQ, nK).masked_fill(~causal, float("-inf")), dim=-1)
    return p * (qcount > 0)[:, None]


def _own_mass(mass: torch.Tensor) -> torch.Tensor:
    """The mass of every query block on its own key block: `[..., nQ, 1]` (0 where `qb >= nK`)."""
    nQ, nK = mass.shape[-2:]
    qi = torch.arange(nQ, device=mass.device)[:, None]
    own = mass.gather(-1, qi.clamp(max=nK - 1).expand(*mass.shape[:-1], 1))
    return own * (qi < nK)


def cumulative_select(mass: torch.Tensor, gamma: float, cap: int) -> torch.Tensor:
    """Per query block (axis -2, absolute index qb), `dam_kernels.dynamic.mass_select` on its row: the own
    block's mass counts as kept, then blocks `kb < qb` join by decreasing mass (ties to the lower index) while
    the mass still left out exceeds `1 - gamma` of the row's total, at most `cap`, never a block of mass 0.
    mass `[..., nQ, nK]`; returns bool like it."""
    nQ, nK = mass.shape[-2:]
    ki = torch.arange(nK, device=mass.device)
    cand = ki[None, :] < torch.arange(nQ, device=mass.device)[:, None]
    ms, order = torch.sort(mass.masked_fill(~cand, -1.0), dim=-1, descending=True, stable=True)
    left = ms.clamp(min=0).flip(-1).cumsum(-1).flip(-1)  # this block's mass and every lighter candidate's
    keep = (left > (1 - gamma) * (_own_mass(mass) + left[..., :1])) & (ki < cap)
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def global_select(mass: torch.Tensor, gamma: float, cap: int) -> torch.Tensor:
    """Per head (all leading axes but the last two), over all query blocks at once: the own blocks' mass
    counts as kept, then pairs (qb, kb < qb) join by decreasing mass (ties to the lower qb, then kb) while the
    kept mass is below `gamma` of the total over all query blocks; a query block adds at most `cap` (its
    heaviest), never a block of mass 0. mass `[..., nQ, nK]`; returns bool like it."""
    nQ, nK = mass.shape[-2:]
    cand = torch.arange(nK, device=mass.device)[None, :] < torch.arange(nQ, device=mass.device)[:, None]
    m = mass.masked_fill(~cand, -1.0)
    within = torch.sort(m, dim=-1, descending=True, stable=True).indices  # rank inside the query block
    rank = torch.empty_like(within).scatter_(-1, within, torch.arange(nK, device=mass.device).expand_as(within)
                                             .contiguous())
    eligible = cand & (rank < cap) & (mass > 0)
    flat = m.masked_fill(~eligible, -1.0).flatten(-2)
    ms, order = torch.sort(flat, dim=-1, descending=True, stable=True)
    total = (mass * cand).sum((-1, -2)) + _own_mass(mass).sum((-1, -2))
    before = _own_mass(mass).sum((-1, -2))[..., None] + ms.clamp(min=0).cumsum(-1) - ms.clamp(min=0)
    keep = (before < gamma * total[..., None]) & (ms > 0)
    return torch.zeros_like(keep).scatter_(-1, order, keep).reshape(mass.shape)


def _present(start: int, Sq: int, nQ: int, block: int, device) -> torch.Tensor:
    """bool [nQ, 1]: query blocks holding a row of the call."""
    qi = torch.arange(nQ, device=device)[:, None]
    return (qi >= start // block) & (qi <= (start + Sq - 1) // block)


def _select(estimate, select, q, k, start, block, scale, tail_mass, tail_cap):
    """`select(estimate(rows))` over the call's rows, all but the last query block's when `tail_mass` is set
    (that block then by the exact-mass rule, at most `tail_cap`): bool [B, H, nQ, nK]."""
    B, H, Sq, _ = q.shape
    nQ, nK = -(-(start + Sq) // block), -(-k.shape[2] // block)
    qt = (start + Sq - 1) // block
    n = Sq if tail_mass is None else max(0, qt * block - start)  # rows estimated
    chosen = torch.zeros(B, H, nQ, nK, dtype=torch.bool, device=q.device)
    if n > 0:
        mass = estimate(q[:, :, :n])
        chosen[:, :, :mass.shape[2]] = select(mass) & _present(start, n, mass.shape[2], block, q.device)
    if tail_mass is not None:
        r0 = max(0, qt * block - start)
        chosen[:, :, qt] = mass_select(tail_block_mass(q[:, :, r0:], k, start + r0, block, scale), qt, tail_mass,
                                       tail_cap)
    return chosen


def group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The mean of each kv head's query heads: `[B, kv_heads, Sq, D]` in q's dtype (float32 sums), the one query an
    estimate per kv head scores with. Its q.k is the mean of the heads' q.k, so one estimate stands for the group."""
    B, H, Sq, D = q.shape
    return q.view(B, kv_heads, H // kv_heads, Sq, D).mean(2, dtype=torch.float32).to(q.dtype)


def _cumulative_by(estimate, q, k, start, block, gamma, cap, stride, scale, tail_mass, tail_cap,
                   per_kv_head: bool = False) -> torch.Tensor:
    """`cumulative_select` of `estimate(rows, k, start, block, stride, scale)` over the call's rows (the last
    block by the exact-mass rule with `tail_mass`), the Triton row rule on CUDA where it fits. `per_kv_head`: one
    estimate and one selection per kv head, from its query heads' mean query (`group_queries`), shared by them; the
    last block stays per query head."""
    _check(block, gamma, cap, stride)
    select = cumulative_select
    if q.is_cuda:
        from . import select_rows

        if select_rows.supports(-(-k.shape[2] // block)):
            select = select_rows.cumulative_select
    H_kv, G = k.shape[1], q.shape[1] // k.shape[1]
    if per_kv_head and G > 1:  # one estimate per kv head, its blocks for each of the group's query heads
        return _select(lambda rows: estimate(group_queries(rows, H_kv), k, start, block, stride, scale),
                       lambda mass: select(mass, gamma, cap).repeat_interleave(G, dim=1),
                       q, k, start, block, scale, tail_mass, cap if tail_cap is None else tail_cap)
    return _select(lambda rows: estimate(rows, k, start, block, stride, scale), lambda mass: select(mass, gamma, cap),
                   q, k, start, block, scale, tail_mass, cap if tail_cap is None else tail_cap)


def antidiag_select(q: torch.Tensor, k: torch.Tensor, start: int, block: int, gamma: float, cap: int,
                    stride: int = 8, scale: float | None = None, tail_mass: float | None = None,
                    tail_cap: int | None = None) -> torch.Tensor:
    """XAttention's selection (module doc): `cumulative_select` of `antidiag_block_mass`, bool
    `[B, H, nQ, nK]` as `select_blocks` returns it. `tail_mass` (None: off): the call's last query block by
    the exact-mass rule instead (and not estimated), at most `tail_cap` (default `cap`) blocks."""
    estimate = antidiag_block_mass
    if q.is_cuda:
        from . import antidiag

        if antidiag.supports(q, block, stride):
            estimate = antidiag.antidiag_block_mass
    return _cumulative_by(estimate, q, k, start, block, gamma, cap, stride, scale, tail_mass, tail_cap)


def antisum_select(q: torch.Tensor, k: torch.Tensor, start: int, block: int, gamma: float, cap: int,
                   stride: int = 8, scale: float | None = None, tail_mass: float | None = None,
                   tail_cap: int | None = None, per_kv_head: bool = False, row_step: int = 1) -> torch.Tensor:
    """XAttention's selection with its own estimate: `cumulative_select` of `antisum_block_mass` (a stride's
    antidiagonal summed before the softmax: a product `stride` times deeper and a softmax `stride` times
    smaller than `antidiag_block_mass`'s), bool `[B, H, nQ, nK]`; arguments as in `antidiag_select`.
    `per_kv_head`: one estimate per kv head from its query heads' mean query, its blocks shared by them (the
    estimate costs 1 / group of the per-head one; the last block stays per head). `row_step`: one row group in
    `row_step` of each query block estimated (`group_presence`)."""
    estimate = antisum_block_mass
    if q.is_cuda:
        from . import antisum

        if antisum.supports(q, block, stride):
            estimate = antisum.estimate_or_reference
    elif row_step <= 1 and q.device.type == "cpu":
        from . import cpu_sparse

        if cpu_sparse.load() is not None:  # the compiled estimate (cpu_antisum.c): the same numbers up to rounding
            estimate = cpu_sparse.antisum_block_mass
    if row_step > 1:
        estimate = functools.partial(estimate, row_step=row_step)
    return _cumulative_by(estimate, q, k, start, block, gamma, cap, stride, scale, tail_mass, tail_cap,
                          per_kv_head)


def flex_select(q: torch.Tensor, k: torch.Tensor, start: int, block: int, gamma: float, cap: int,
                scale: float | None = None, tail_mass: float | None = None,
                tail_cap: int | None = None) -> torch.Tensor:
    """FlexPrefill's query-aware selection (module doc): `global_select` of `pooled_block_mass`, bool
    `[B, H, nQ, nK]` as `select_blocks` returns it; `tail_mass` and `tail_cap` as in `antidiag_select` (the
    last query block then takes no share of the head's budget)."""
    _check(block, gamma, cap)
    return _select(lambda rows: pooled_block_mass(rows, k, start, block, scale),
                   lambda mass: global_select(mass, gamma, cap), q, k, start, block, scale, tail_mass,
                   cap if tail_cap is None else tail_cap)
