"""The selection kernels (`dam_kernels.select.select_extra`) against their PyTorch reference:
`select_blocks_one` with kept block summaries, and the extra-candidate list `dam_decode` builds
from it, for both block scores.
Integer-valued queries and keys make every score exact in fp32, so the chosen blocks must be the
same, ties included. CPU: Triton in the interpreter; with TRITON_INTERPRET=0 on a GPU, compiled."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from dam_kernels.decode import dam_decode  # noqa: E402
from dam_kernels.dynamic import block_summary, dynamic_rows, select_blocks, select_blocks_one  # noqa: E402
from dam_kernels.layout import device_masks  # noqa: E402
from dam_kernels.select import select_extra  # noqa: E402
from dam_kernels.selection import DynamicSelection  # noqa: E402
from helpers import dense_masked_softmax, random_profile, require_kernel_device  # noqa: E402

DEVICE = require_kernel_device()


def _int_inputs(B, H, H_kv, slots, n_valid, D=16, seed=0, lo=-3, hi=4):
    """Integer-valued q (one row) and a static cache whose slots past `n_valid` hold NaN."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi, (B, H, 1, D), generator=g).float()
    k = torch.randint(lo, hi, (B, H_kv, slots, D), generator=g).float()
    v = torch.randn(B, H_kv, slots, D, generator=g)
    k[:, :, n_valid:] = float("nan")
    v[:, :, n_valid:] = float("nan")
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("score", ["mean", "bound"])
@pytest.mark.parametrize("H, H_kv", [(4, 2), (6, 2), (3, 3), (8, 1)])
@pytest.mark.parametrize("n_valid", [1, 17, 64, 100, 161])
@pytest.mark.parametrize("topk", [1, 3, 99])
def test_fused_selection_equals_reference(H, H_kv, n_valid, topk, score):
    _fused_selection_equals_reference(H, H_kv, n_valid, topk, score, D=16)


@pytest.mark.parametrize("score", ["mean", "bound"])
@pytest.mark.parametrize("n_valid, topk", [(17, 3), (161, 1), (161, 99)])
def test_fused_selection_equals_reference_at_head_dim_256(n_valid, topk, score):
    _fused_selection_equals_reference(4, 1, n_valid, topk, score, D=256)  # Gemma 3's shape


def _fused_selection_equals_reference(H, H_kv, n_valid, topk, score, D):
    slots, blk, bn, L = 192, 32, 16, 16
    q, k, _ = _int_inputs(2, H, H_kv, slots, n_valid, D=D, seed=n_valid * 7 + topk + H)
    vl = torch.tensor([n_valid], device=DEVICE)
    sums = block_summary(torch.nan_to_num(k, nan=0.0), blk, score)  # what the updates keep: finite
    sums[:, :, -(-n_valid // blk):] = float("nan")  # blocks past the fill level must never count
    want = select_blocks_one(q, k, 0, topk, blk, valid_len=vl, sums=sums, score=score)  # [B, H, n_k]
    dyn, extra_idx, extra_num, max_extra = select_extra(q, sums, DynamicSelection(topk, blk, score=score), block_n=bn,
                                                         pcl=L, n_keys=slots, valid_len=vl,
                                                         max_extra=topk * (H // H_kv) * 2)
    assert torch.equal(dyn.bool(), want)
    # The candidate list: the group's union in blocks of bn, outside [0, L) and the window, ascending.
    n_kb, nb1 = slots // bn, L // bn
    win = max(nb1, max(L, n_valid - 1 - L + 1) // bn)
    union = want.reshape(2, H_kv, H // H_kv, -1).any(2).repeat_interleave(blk // bn, -1)[..., :n_kb]
    idx = torch.arange(n_kb, device=DEVICE)
    extra = union & (idx >= nb1) & (idx < win)
    for r in range(2 * H_kv):
        got = extra_idx[r, : int(extra_num[r])].tolist()
        assert got == torch.nonzero(extra.reshape(2 * H_kv, -1)[r]).flatten().tolist()
    assert max_extra == topk * (H // H_kv) * 2 or max_extra == n_kb


def test_ties_go_to_the_lower_block():
    # All-zero queries: every earlier block scores 0; the reference keeps the lowest indices.
    q = torch.zeros(1, 2, 1, 16, device=DEVICE)
    k = torch.ones(1, 1, 128, 16, device=DEVICE)
    vl = torch.tensor([128], device=DEVICE)
    sums = block_summary(k, 16)
    dyn, _, _, _ = select_extra(q, sums, DynamicSelection(3, 16), block_n=16, pcl=16, n_keys=128, valid_len=vl)
    assert dyn[0, :, :].nonzero()[:, 1].tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(dyn.bool(), select_blocks_one(q, k, 0, 3, 16, valid_len=vl, sums=sums))


@pytest.mark.parametrize("n_valid", [70, 129, 191])
def test_decode_with_fused_selection_equals_dense(n_valid):
    """The decode kernel fed by the fused selection computes static | selected blocks, exactly."""
    prof = random_profile(seed=n_valid)
    slots, blk, topk = 192, 16, 2
    q, k, v = _int_inputs(2, 4, 2, slots, n_valid, seed=n_valid)
    q = q / 4  # keep the softmax soft
    vl = torch.tensor([n_valid], device=DEVICE)
    sums = block_summary(torch.nan_to_num(k, nan=0.0), blk)
    masks = device_masks(prof, 0, q.device)
    ext = select_extra(q, sums, DynamicSelection(topk, blk), block_n=16, pcl=prof.pcl, n_keys=slots, valid_len=vl,
                       max_extra=topk * 2)
    out = dam_decode(q, k, v, masks, start=0, scale=0.25, block_n=16, dyn_block=blk, valid_len=vl, extra=ext)
    kk, vv = k[:, :, :n_valid], v[:, :, :n_valid]
    start = n_valid - 1
    chosen = select_blocks(q, kk, start, topk, blk)
    rows = torch.tensor([start])
    allowed = prof.mask_rows(0, rows, n_valid).to(DEVICE) | dynamic_rows(chosen, rows, n_valid, blk)
    torch.testing.assert_close(out.double(), dense_masked_softmax(q, kk, vv, allowed, scale=0.25), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("score", ["mean", "bound"])
@pytest.mark.parametrize("n_valid, topk", [(4000, 32), (4000, 7), (2100, 64), (700, 1)])
def test_many_blocks_and_heavy_ties(n_valid, topk, score):
    """Hundreds of candidate blocks (the search works on a row of 256 after padding) whose
    integer scores repeat many times: the k-th largest value is shared, and the lowest indices
    among it must be the ones kept, as the reference's stable sort keeps them."""
    slots, blk = 4096, 16
    q, k, _ = _int_inputs(1, 4, 2, slots, n_valid, D=16, seed=n_valid + topk, lo=-1, hi=2)
    vl = torch.tensor([n_valid], device=DEVICE)
    sums = block_summary(torch.nan_to_num(k, nan=0.0), blk, score)
    want = select_blocks_one(q, k, 0, topk, blk, valid_len=vl, sums=sums, score=score)
    dyn, *_ = select_extra(q, sums, DynamicSelection(topk, blk, score=score), block_n=16, pcl=16, n_keys=slots,
                           valid_len=vl)
    assert torch.equal(dyn.bool(), want)
    assert int(want.sum(-1).min()) == min(topk, (n_valid - 1) // blk)



def test_head_dims_the_fused_selection_does_not_take_select_in_the_torch_chain():
    """A graph-loop decode step (device position, kept block sums, no exact-mass rule) at head dim 96: the fused
    selection takes 16 to 128 only, so the step selects in the torch chain and still equals the reference.
    (`sparse_attention` hands such a step to the Triton path on CUDA only, so the path is called directly.)"""
    from dam_cli.runtime.attention import _triton_attention, sparse_attention

    prof = random_profile(seed=5)
    slots, n_valid, blk = 448, 300, 64  # 64-key selection blocks: what a GPU's decode kernel tiles (block_n 64)
    q, k, v = _int_inputs(1, 4, 2, slots, n_valid, D=96, seed=9)
    q = q / 8
    k, v = torch.nan_to_num(k, nan=0.0), torch.nan_to_num(v, nan=0.0)
    dyn = DynamicSelection(2, blk)
    vl = torch.tensor([n_valid]).to(DEVICE)
    got = _triton_attention(q, k, v, prof, 0, 0, None, dyn, valid_len=vl, block_sums=block_summary(k, blk))
    want = sparse_attention(q, k[:, :, :n_valid], v[:, :, :n_valid], prof, 0, start=n_valid - 1, backend="reference",
                            dynamic=dyn)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
