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


@pytest.mark.parametrize("S, block_n, window, p_sel, seed", [
    (700, 64, None, 0.3, 0),
    (700, 16, None, 0.3, 1),  # key blocks a quarter of the selection's
    (1000, 64, 200, 0.5, 2),  # a window layout (full blocks on its edge demoted to partial)
    (130, 32, None, 0.9, 3),  # nearly every block selected
    (900, 64, None, 0.0, 4),  # nothing selected
])
def test_the_merge_on_lists_equals_the_merge_on_maps(S, block_n, window, p_sel, seed):
    prof = random_profile(1, 4, 40, p_m=0.3, p_r=0.1, p_c=0.05, seed=seed)
    lay = layout_for(prof, 0, S, 64, block_n, "cpu", window=window)
    g = torch.Generator().manual_seed(seed)
    nQ, nKd = lay.n_q_blocks, -(-S // 64)
    chosen = torch.rand(4, nQ, nKd, generator=g) < p_sel
    chosen &= torch.arange(nKd)[None, None, :] < torch.arange(nQ)[None, :, None]  # earlier blocks, as selected
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
