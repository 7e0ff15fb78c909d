"""The dynamic part in decode steps: the split-K decode kernel with the selected key blocks as
extra candidates (no layout built), against a dense masked softmax of static mask | selection.
CPU: Triton in the interpreter; with TRITON_INTERPRET=0 on a GPU the same tests run compiled."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from dam_kernels.dynamic import DynamicSelection, dynamic_rows, select_blocks, select_blocks_one  # noqa: E402
from helpers import dense_masked_softmax, random_profile, random_qkv, require_kernel_device  # noqa: E402

from dam_cli.runtime.attention import sparse_attention  # noqa: E402

DEVICE = require_kernel_device()


@pytest.mark.parametrize("S, Sq", [(100, 1), (129, 1), (150, 3), (47, 2), (20, 1)])
def test_select_blocks_one_equals_the_row_of_select_blocks(S, Sq):
    q, k, _ = random_qkv(2, 6, 2, S, S - Sq, seed=S, device=DEVICE)
    start = S - Sq
    for topk in (1, 3, 99):
        full = select_blocks(q, k, start, topk, 16)[:, :, start // 16]
        assert torch.equal(select_blocks_one(q, k, start, topk, 16), full)


@pytest.mark.parametrize("retrieval", [False, True])
@pytest.mark.parametrize("topk", [1, 3, 99])
@pytest.mark.parametrize("S, Sq", [(100, 1), (131, 1), (150, 3), (40, 2)])
def test_decode_with_selection_equals_dense_masked_softmax(S, Sq, topk, retrieval):
    # L = 16, blocks of 16: beyond 2L the selected blocks lie between the static candidate
    # ranges [0, L) and the recent window, so they reach the kernel as extra candidates.
    full = torch.tensor([[False, True, False, False]]) if retrieval else None
    prof = random_profile(seed=S + topk, full_heads=full)
    start = S - Sq
    q, k, v = random_qkv(2, 4, 2, S, start, seed=S * topk, device=DEVICE)
    out = sparse_attention(q, k, v, prof, 0, start=start, backend="triton", dynamic=DynamicSelection(topk, 16))
    rows = torch.arange(start, S)
    chosen = select_blocks(q, k, start, topk, 16)
    allowed = prof.mask_rows(0, rows, S).to(DEVICE) | dynamic_rows(chosen, rows, S, 16)
    want = dense_masked_softmax(q, k, v, allowed, scale=16**-0.5)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    ref = sparse_attention(q, k, v, prof, 0, start=start, backend="reference", dynamic=DynamicSelection(topk, 16))
    torch.testing.assert_close(ref.double(), want, atol=2e-5, rtol=1e-4)
    if topk == 99 and S > 64:  # every earlier block: the selection really reaches the kernel
        i, j = rows[:, None], torch.arange(S)[None, :]
        every = prof.mask_rows(0, rows, S) | ((j // 16) < (i // 16))
        torch.testing.assert_close(out.double(), dense_masked_softmax(q, k, v, every[None].to(DEVICE), scale=16**-0.5),
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("S, Sq", [(100, 1), (131, 1), (150, 3)])
def test_decode_step_uses_the_tail_budget(S, Sq):
    """A decode call's rows are the call's last query block: they get `tail_topk` blocks, in the
    decode kernel and in the reference alike."""
    prof = random_profile(seed=S)
    start = S - Sq
    q, k, v = random_qkv(2, 4, 2, S, start, seed=S + 1, device=DEVICE)
    out = sparse_attention(q, k, v, prof, 0, start=start, backend="triton", dynamic=DynamicSelection(1, 16, 3))
    rows = torch.arange(start, S)
    chosen = select_blocks(q, k, start, 3, 16)
    assert torch.equal(select_blocks(q, k, start, 1, 16, tail_topk=3), chosen)
    allowed = prof.mask_rows(0, rows, S).to(DEVICE) | dynamic_rows(chosen, rows, S, 16)
    want = dense_masked_softmax(q, k, v, allowed, scale=16**-0.5)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    ref = sparse_attention(q, k, v, prof, 0, start=start, backend="reference", dynamic=DynamicSelection(1, 16, 3))
    torch.testing.assert_close(ref.double(), want, atol=2e-5, rtol=1e-4)
    top1 = sparse_attention(q, k, v, prof, 0, start=start, backend="triton", dynamic=DynamicSelection(1, 16))
    assert (top1 - out).abs().max() > 1e-3  # the wider budget really changes the step
