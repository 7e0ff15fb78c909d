"""Triton kernel: `block_mass.cumulative_select` (its PyTorch reference) over every query block of a prefill at once.

The prompt's selection by estimated mass (`antidiag_select`) keeps, per query block `qb`, its own block and
the heaviest earlier blocks until `gamma` of the row's mass is kept, at most `cap`. The reference sorts every
row (at 131,072 tokens and 32 heads: 65,536 rows of 2,048 blocks per layer; 198 ms of the selection's 842 ms of
GPU time in a 16-layer prefill on an H100). Here one program per row holds it in registers and applies
`select_mass.kept_by_mass`: a binary search over the masses' bits (`bit_search`), then a top-k search only where
the cap binds. No sort, one launch.

The same blocks are chosen as by the sort unless two compared quantities (two masses, or a left-out mass and
the limit) differ by rounding only: the kernel sums in another order (tree reductions, not a cumulative sum
over the sorted masses), as `select_mass`'s decode rule does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .select_mass import kept_by_mass

MAX_BLOCKS = 8192  # key blocks one program holds (524,288 tokens at 64-key blocks)


@triton.jit(do_not_specialize=["nQ", "nK", "cap"])
def _rows_select_kernel(
    MASS, SEL,  # [R, nQ, nK] f32 contiguous (R = B * H); [R, nQ, nK] u8
    nQ, nK, cap, one_minus_gamma,
    NK_POW2: tl.constexpr,
):
    r = tl.program_id(0)  # one (batch, head, query block) row
    qb = r % nQ
    idx = tl.arange(0, NK_POW2)
    in_row = idx < nK
    base = r.to(tl.int64) * nK
    mass = tl.load(MASS + base + idx, mask=in_row, other=0.0)
    mass = tl.maximum(mass, 0.0) + 0.0  # as the reference's clamp; + 0.0: no -0.0, the bits order as the floats
    cand = idx < qb
    own = tl.sum(tl.where(idx == qb, mass, 0.0), 0)
    sel = kept_by_mass(mass, cand, own, one_minus_gamma, cap, False)
    tl.store(SEL + base + idx, sel.to(tl.uint8), mask=in_row)


def supports(n_blocks: int) -> bool:
    """Whether one program can hold a row of `n_blocks` key blocks (at most MAX_BLOCKS)."""
    return 1 <= n_blocks <= MAX_BLOCKS


def cumulative_select(mass: torch.Tensor, gamma: float, cap: int) -> torch.Tensor:
    """`block_mass.cumulative_select(mass, gamma, cap)` in one launch (module doc): bool like `mass`
    `[..., nQ, nK]`, axis -2 the absolute query block."""
    nQ, nK = mass.shape[-2:]
    assert mass.dtype == torch.float32 and supports(nK) and 0 < gamma <= 1
    m = mass.contiguous()
    rows = m.numel() // nK
    sel = torch.empty(m.shape, device=m.device, dtype=torch.uint8)
    if rows == 0:
        return sel.view(torch.bool)
    nk_pow2 = max(64, triton.next_power_of_2(nK))
    _rows_select_kernel[(rows,)](
        m, sel, nQ, nK, max(0, int(cap)), 1.0 - float(gamma),
        NK_POW2=nk_pow2, num_warps=8 if nk_pow2 >= 2048 else 4,
    )
    return sel.view(torch.bool)
