"""The "bound" block score of the dynamic part (`--dynamic-score bound`): an upper bound on the
pooled query's q.k over a key block, from the block's elementwise key maximum and minimum.
Hand-worked selections, the bound property, and reference vs Triton vs a dense masked softmax
(the decode-time summaries: tests/dam_kernels/test_dynamic.py). CPU: Triton in the interpreter;
compiled with TRITON_INTERPRET=0 on a GPU."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from dam_kernels.dynamic import (  # noqa: E402
    DynamicSelection,
    _key_features,
    _query_features,
    block_summary,
    dynamic_rows,
    select_blocks,
    select_blocks_one,
)
from helpers import dense_masked_softmax, random_profile, random_qkv, require_kernel_device  # noqa: E402

from dam_cli.errors import DamError  # noqa: E402
from dam_cli.runtime.attention import sparse_attention  # noqa: E402

DEVICE = require_kernel_device()


def _hand_case():
    # One head, D = 2, blocks of 2 positions. Key block 0 holds one key that stands out, (4, 0),
    # beside (-4, 0): its mean is (0, 0). Key block 1 is two copies of (1, 0): mean (1, 0).
    # Query block 2 (rows 4, 5) pools to (1, 0).
    q = torch.tensor([[[[0.0, 1], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0]]]], device=DEVICE)
    k = torch.tensor([[[[4.0, 0], [-4, 0], [1, 0], [1, 0], [0, 0], [0, 0]]]], device=DEVICE)
    return q, k


def test_bound_finds_the_block_with_the_outstanding_key_where_the_mean_does_not():
    q, k = _hand_case()
    # mean: block 0 scores (1,0).(0,0) = 0, block 1 scores (1,0).(1,0) = 1 -> block 1.
    assert select_blocks(q, k, 0, 1, 2)[0, 0, 2].tolist() == [False, True, False]
    # bound: block 0 scores 1 * max(4, -4) = 4 (the key (4, 0) itself), block 1 scores 1 -> block 0.
    assert select_blocks(q, k, 0, 1, 2, score="bound")[0, 0, 2].tolist() == [True, False, False]
    # A negative query component takes the block's minimum: (-1, 0) scores -1 * -4 = 4 on block 0
    # and -1 * 1 = -1 on block 1.
    qn = q.clone()
    qn[..., 4:, 0] = -1
    assert select_blocks(qn, k, 0, 1, 2, score="bound")[0, 0, 2].tolist() == [True, False, False]
    # The one-row call (a decode step) agrees.
    assert select_blocks_one(q[:, :, 5:], k, 5, 1, 2, score="bound")[0, 0].tolist() == [True, False, False]


def test_bound_scores_hand_worked_and_never_below_the_best_key():
    q, k = _hand_case()
    feats = _key_features(k, 2, "bound")  # [1, 1, 3, 4]: max then min per block
    assert feats[0, 0].tolist() == [[4, 0, -4, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    qf = _query_features(torch.tensor([[0.5, -2.0]]), "bound")
    assert qf.tolist() == [[0.5, 0.0, 0.0, -2.0]]
    # Random keys: the bound is at least the best q.k in every block, and equals it when the
    # block's keys are all the same vector.
    g = torch.Generator().manual_seed(0)
    kr = torch.randn(2, 3, 80, 8, generator=g)
    kr[:, :, 16:32] = kr[:, :, 16:17]  # block 1: one key repeated
    qbar = torch.randn(2, 3, 5, 8, generator=g)
    bound = torch.matmul(_query_features(qbar, "bound"), _key_features(kr, 16, "bound").transpose(-1, -2))
    exact = torch.matmul(qbar, kr.transpose(-1, -2)).reshape(2, 3, 5, 5, 16).amax(-1)
    assert (bound >= exact - 1e-5).all()
    torch.testing.assert_close(bound[..., 1], exact[..., 1])
    assert (bound - exact).abs().max() > 0.1  # a bound, not the exact maximum, on mixed blocks


def test_bound_summary_short_last_block_and_bf16():
    k = torch.randn(1, 2, 37, 4, generator=torch.Generator().manual_seed(1))
    s = block_summary(k, 16, "bound")
    assert s.shape == (1, 2, 3, 8) and s.dtype == torch.float32
    torch.testing.assert_close(s[..., 2, :4], k[:, :, 32:].amax(2))
    torch.testing.assert_close(s[..., 2, 4:], k[:, :, 32:].amin(2))
    kb = k.to(torch.bfloat16)
    assert torch.equal(block_summary(kb, 16, "bound"), block_summary(kb.float(), 16, "bound"))  # max/min are exact


@pytest.mark.parametrize("S, Sq", [(100, 1), (129, 1), (150, 3)])
def test_select_blocks_one_bound_equals_the_row_of_select_blocks(S, Sq):
    q, k, _ = random_qkv(2, 6, 2, S, S - Sq, seed=S, device=DEVICE)
    start = S - Sq
    for topk in (1, 3):
        want = select_blocks(q, k, start, topk, 16, score="bound")[:, :, start // 16]
        assert torch.equal(select_blocks_one(q, k, start, topk, 16, score="bound"), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("start,S", [(0, 70), (50, 70), (149, 150)])
def test_bound_triton_and_reference_equal_dense_masked_softmax(dtype, start, S):
    prof = random_profile(seed=3)
    q, k, v = (t.to(dtype) for t in random_qkv(2, 4, 2, S, start, seed=5, device=DEVICE))
    chosen = select_blocks(q, k, start, 1, 16, score="bound")
    assert not torch.equal(chosen, select_blocks(q, k, start, 1, 16))  # the score changes the selection
    rows = torch.arange(start, S)
    allowed = prof.mask_rows(0, rows, S).to(DEVICE) | dynamic_rows(chosen, rows, S, 16)
    dense = dense_masked_softmax(q, k, v, allowed, scale=16**-0.5)
    low = (dense.to(dtype).double() - dense).abs().max()
    tol = 2 * float(low) + (1e-5 if dtype == torch.float32 else 2e-3)
    for backend in ("reference", "triton"):
        out = sparse_attention(q, k, v, prof, 0, start=start, backend=backend,
                               dynamic=DynamicSelection(1, 16, score="bound"))
        assert (out.double() - dense).abs().max() <= tol, (backend, (out.double() - dense).abs().max())


def test_bound_covering_every_block_equals_static_plus_full():
    # With k covering every earlier block the score does not matter.
    prof = random_profile()
    q, k, v = random_qkv(2, 4, 2, 70, 0, seed=1, device=DEVICE)
    a = sparse_attention(q, k, v, prof, 0, backend="reference", dynamic=DynamicSelection(99, 16, score="bound"))
    b = sparse_attention(q, k, v, prof, 0, backend="reference", dynamic=DynamicSelection(99, 16))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_score_is_refused():
    prof = random_profile()
    q, k, v = random_qkv(1, 4, 2, 20, 0, seed=1, device=DEVICE)
    with pytest.raises(DamError, match="unknown DynamicSelection.score 'max': choose one of mean, bound"):
        sparse_attention(q, k, v, prof, 0, dynamic=DynamicSelection(2, 16, score="max"))
    with pytest.raises(ValueError, match="unknown block score"):
        select_blocks(q, k, 0, 1, 16, score="max")
