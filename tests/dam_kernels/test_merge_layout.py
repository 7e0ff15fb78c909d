"""`dynamic.merge_layout` (the selected blocks joined to a layer's layout as full blocks, on index lists) against
the merge on dense `[H, nQ, nK]` block maps it replaced: the same lists in the same order, the same counts and
partial share, so the prefill kernel visits the same blocks in the same order (the same bits out)."""

from __future__ import annotations

import pytest
import torch
from dam_kernels.dynamic import merge_layout
from dam_kernels.layout import BlockLayout, _compact, layout_for
from helpers import random_profile


def _merge_on_maps(layout, chosen, block):
    """The merge as it was: dense maps of the layout, OR the selection, compact again."""
    f = block // layout.block_n
    kept, full = layout.to_dense()
    H, nQ, nK = kept.shape
    dyn = chosen.repeat_interleave(f, dim=-1)[..., :nK]
    dyn = torch.nn.functional.pad(dyn, (0, nK - dyn.shape[-1]))[:, :nQ]
    new_full = full | dyn
    new_part = kept & ~new_full
    cand = torch.arange(nK, device=kept.device).expand(nQ, nK)
    p_num, p_idx = _compact(new_part, cand)
    f_num, f_idx = _compact(new_full, cand)
    n_part, n_full = int(p_num.sum()), int(f_num.sum())
    return p_num, p_idx, f_num, f_idx, n_part / max(1, n_part + n_full)


def _rows(num, idx):
    return [[idx[h, q, : num[h, q]].tolist() for q in range(num.shape[1])] for h in range(num.shape[0])]


def _case(S, block_n, window, p_sel, seed):
    """A random profile's layout on the CPU, and a selection of earlier blocks (each with chance `p_sel`)."""
    prof = random_profile(1, 4, 40, p_m=0.3, p_r=0.1, p_c=0.05, seed=seed)
    lay = layout_for(prof, 0, S, 64, block_n, "cpu", window=window)
    g = torch.Generator().manual_seed(seed)
    nQ, nKd = lay.n_q_blocks, -(-S // 64)
    chosen = torch.rand(4, nQ, nKd, generator=g) < p_sel
    chosen &= torch.arange(nKd)[None, None, :] < torch.arange(nQ)[None, :, None]  # earlier blocks, as selected
    return prof, lay, chosen


CASES = [
    (700, 64, None, 0.3, 0),
    (700, 16, None, 0.3, 1),  # key blocks a quarter of the selection's
    (1000, 64, 200, 0.5, 2),  # a window layout (full blocks on its edge demoted to partial)
    (130, 32, None, 0.9, 3),  # nearly every block selected
    (900, 64, None, 0.0, 4),  # nothing selected
]


@pytest.mark.parametrize("S, block_n, window, p_sel, seed", CASES)
def test_the_merge_on_lists_equals_the_merge_on_maps(S, block_n, window, p_sel, seed):
    _, lay, chosen = _case(S, block_n, window, p_sel, seed)
    got = merge_layout(lay, chosen, 64)
    p_num, p_idx, f_num, f_idx, share = _merge_on_maps(lay, chosen, 64)
    assert isinstance(got, BlockLayout) and got.kv_indices.dtype == torch.int32
    assert torch.equal(got.kv_num_blocks.long(), p_num) and torch.equal(got.full_kv_num_blocks.long(), f_num)
    assert _rows(got.kv_num_blocks, got.kv_indices) == _rows(p_num, p_idx)
    assert _rows(got.full_kv_num_blocks, got.full_kv_indices) == _rows(f_num, f_idx)
    assert got.partial_share == share
    assert got.kv_indices.shape[-1] == max(1, int(p_num.max())) and got.full_kv_indices.shape[-1] == max(
        1, int(f_num.max()))
    if p_sel:
        assert int(f_num.sum()) > int(lay.full_kv_num_blocks.sum())  # the case bites: blocks joined


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the one-launch merge: compiled on a GPU, interpreted here


def _on_cpu(lay):
    return BlockLayout(*(t.cpu() for t in (lay.kv_num_blocks, lay.kv_indices, lay.full_kv_num_blocks,
                                           lay.full_kv_indices)), lay.length, lay.block_m, lay.block_n,
                       lay.partial_share)


@pytest.mark.parametrize("tiles", [(1024, 128), (16, 4)])  # the shipped steps; steps small enough to cross seams
@pytest.mark.parametrize("S, block_n, window, p_sel, seed", [
    *CASES,
    (3000, 64, None, 0.2, 5),  # rows of 47 key blocks
])
def test_the_one_launch_merge_equals_the_merge_on_lists(S, block_n, window, p_sel, seed, tiles):
    from dam_kernels import merge_lists

    prof, lay, chosen = _case(S, block_n, window, p_sel, seed)
    want = merge_layout(lay, chosen, 64)
    most = int(chosen.sum(-1).max())
    overflow = torch.zeros(1, dtype=torch.int32, device=DEV)
    got = _on_cpu(merge_lists.merge_layout(layout_for(prof, 0, S, 64, block_n, DEV, window=window), chosen.to(DEV),
                                           64, most, overflow, *tiles))
    assert int(overflow) == 0 and got.partial_share is None
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)
    assert torch.equal(got.full_kv_num_blocks, want.full_kv_num_blocks)
    assert _rows(got.kv_num_blocks, got.kv_indices) == _rows(want.kv_num_blocks, want.kv_indices)
    assert _rows(got.full_kv_num_blocks, got.full_kv_indices) == _rows(want.full_kv_num_blocks,
                                                                         want.full_kv_indices)
    for num, idx in ((got.kv_num_blocks, got.kv_indices), (got.full_kv_num_blocks, got.full_kv_indices)):
        past = torch.arange(idx.shape[-1]) >= num[..., None]
        assert not idx[past].any()  # padded with 0, as the layouts are
    if p_sel:
        assert int(got.full_kv_num_blocks.sum()) > int(lay.full_kv_num_blocks.sum())


def test_the_one_launch_merge_counts_rows_past_its_bound():
    from dam_kernels import merge_lists

    prof = random_profile(1, 2, 40, p_m=0.3, p_r=0.1, p_c=0.05, seed=7)
    lay = layout_for(prof, 0, 1500, 64, 64, DEV)
    nQ = lay.n_q_blocks
    chosen = torch.arange(nQ)[None, None, :] < torch.arange(nQ)[None, :, None]  # every earlier block
    chosen = chosen.expand(2, nQ, nQ).contiguous().to(DEV)
    static_width = lay.full_kv_indices.shape[-1]
    if static_width + 1 >= nQ:
        pytest.skip("this layout's static full lists already span every block")
    overflow = torch.zeros(1, dtype=torch.int32, device=DEV)
    merge_lists.merge_layout(lay, chosen, 64, 1, overflow)
    assert int(overflow) > 0
    overflow.zero_()
    merge_lists.merge_layout(lay, chosen, 64, nQ, overflow)
    assert int(overflow) == 0


@pytest.mark.parametrize("score, topk, tail", [("antisum", 3, 5), ("mean", 4, 2), ("antisum", 6, None)])
def test_the_prefill_selection_keeps_at_most_its_caps(score, topk, tail):
    """The bound the runtime gives the one-launch merge: no row of `select_blocks` holds more than
    max(topk, tail_topk) blocks."""
    from dam_kernels.dynamic import select_blocks

    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, 900, 32, generator=g)
    k = torch.randn(1, 2, 900, 32, generator=g)
    chosen = select_blocks(q, k, 0, topk, 64, tail_topk=tail, score=score, tail_mass=0.9, mass=0.99)
    most = int(chosen.sum(-1).max())
    assert 0 < most <= max(topk, tail or topk)
