"""The dynamic part (top-k key blocks by pooled q.k) and retrieval heads: reference vs Triton vs
a dense masked softmax built by hand (beyond-paper options); the `DynamicSelection` checks.
CPU: Triton in the interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from dam_kernels.dynamic import DynamicSelection, dynamic_rows, select_blocks  # noqa: E402
from helpers import dense_masked_softmax, random_profile, random_qkv, require_kernel_device  # noqa: E402

from dam_cli.errors import DamError  # noqa: E402
from dam_cli.runtime.attention import sparse_attention  # noqa: E402

DEVICE = require_kernel_device()  # TRITON_INTERPRET=0 on a GPU machine: the same tests, compiled


def test_select_blocks_hand_worked():
    # One head, D = 2, blocks of 2 positions; query block 2 (rows 4, 5) pools to (1, 0).
    q = torch.tensor([[[[0.0, 1], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0]]]], device=DEVICE)
    k = torch.tensor([[[[0.0, 1], [0, 1], [5, 0], [3, 0], [-1, 0], [0, 0]]]], device=DEVICE)
    chosen = select_blocks(q, k, 0, 1, 2)
    # Block 1 (keys 2, 3) pools to (4, 0): the best earlier block for query block 2.
    assert chosen[0, 0, 2].tolist() == [False, True, False]
    # Query block 1 pools to (0, 1): only block 0 is earlier; block 0 of queries has no candidate.
    assert chosen[0, 0, 1].tolist() == [True, False, False]
    assert not chosen[0, 0, 0].any()
    # Ties go to the lower block: all-zero queries score 0 everywhere.
    z = select_blocks(torch.zeros(1, 1, 6, 2, device=DEVICE), k, 0, 1, 2)
    assert z[0, 0, 2].tolist() == [True, False, False]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("start", [0, 37])
def test_topk_covering_every_block_equals_static_plus_full(backend, start):
    prof = random_profile()
    B, H, H_kv, S, blk = 2, 4, 2, 70, 16
    q, k, v = random_qkv(B, H, H_kv, S, start, seed=1, device=DEVICE)
    out = sparse_attention(q, k, v, prof, 0, start=start, backend=backend, dynamic=DynamicSelection(99, blk))
    rows = torch.arange(start, S)
    i, j = rows[:, None], torch.arange(S)[None, :]
    allowed = prof.mask_rows(0, rows, S) | ((j // blk) < (i // blk))  # static + every earlier block
    ref = dense_masked_softmax(q, k, v, allowed[None].to(DEVICE), scale=16**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("start,S", [(0, 70), (0, 33), (50, 70), (69, 70)])
def test_topk_triton_equals_reference(dtype, start, S):
    prof = random_profile(seed=3)
    q, k, v = (t.to(dtype) for t in random_qkv(2, 4, 2, S, start, seed=5, device=DEVICE))
    ref = sparse_attention(q, k, v, prof, 0, start=start, backend="reference", dynamic=DynamicSelection(1, 16))
    tri = sparse_attention(q, k, v, prof, 0, start=start, backend="triton", dynamic=DynamicSelection(1, 16))
    chosen = select_blocks(q, k, start, 1, 16)
    rows = torch.arange(start, S)
    allowed = prof.mask_rows(0, rows, S).to(DEVICE) | dynamic_rows(chosen, rows, S, 16)
    dense = dense_masked_softmax(q, k, v, allowed, scale=16**-0.5)
    low = (dense.to(dtype).double() - dense).abs().max()  # PyTorch's own rounding in this dtype
    tol = 2 * float(low) + (1e-5 if dtype == torch.float32 else 2e-3)
    assert (tri.double() - dense).abs().max() <= tol, (tri.double() - dense).abs().max()
    assert (ref.double() - dense).abs().max() <= tol
    # The dynamic part really changes the result against the static mask alone.
    static = sparse_attention(q, k, v, prof, 0, start=start, backend="reference")
    if S - start > 16:
        assert (static.double() - dense).abs().max() > 10 * tol


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_retrieval_heads_see_every_causal_key(backend):
    full = torch.tensor([[False, True, False, True]])
    prof = random_profile(full_heads=full)
    S, start = 60, 20
    q, k, v = random_qkv(1, 4, 2, S, start, seed=1, device=DEVICE)
    out = sparse_attention(q, k, v, prof, 0, start=start, backend=backend)
    rows = torch.arange(start, S)
    allowed = prof.mask_rows(0, rows, S)
    causal = torch.arange(S)[None, :] <= rows[:, None]
    assert torch.equal(allowed[1], causal) and torch.equal(allowed[3], causal)
    ref = dense_masked_softmax(q, k, v, allowed[None].to(DEVICE), scale=16**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dynamic, needle", [
    (DynamicSelection(-1), "DynamicSelection.topk must be an integer from 0"),
    (DynamicSelection(2, 20), "DynamicSelection.block must be a positive multiple of 16 up to 8192, got 20"),
    (DynamicSelection(2, 16, -1), "DynamicSelection.tail_topk must be an integer from 0 to 2,147,483,647, got -1"),
    (DynamicSelection(0, 16, 3), "DynamicSelection.tail_topk needs DynamicSelection.topk > 0"),
    ((2, 16), "dynamic must be a DynamicSelection"),
])
def test_bad_dynamic_part_is_refused_naming_the_field(dynamic, needle):
    prof = random_profile()
    q, k, v = random_qkv(1, 4, 2, 20, 0, seed=1, device=DEVICE)
    with pytest.raises(DamError, match=needle):
        sparse_attention(q, k, v, prof, 0, dynamic=dynamic)


def test_reference_key_span_skips_only_unreachable_keys():
    """The reference's long-sequence shortcut (rows beyond L read keys < L and the last L) is exact."""
    from dam_kernels.reference import reference_attention

    prof = random_profile(seed=7)
    S, start = 120, 10
    q, k, v = random_qkv(2, 4, 2, S, start, seed=9, device=DEVICE)
    rows_fn = lambda rows, n, k0=0: prof.mask_rows(0, rows, n, k0)  # noqa: E731
    a = reference_attention(q, k, v, rows_fn, start=start, chunk=16, key_span=16)
    b = reference_attention(q, k, v, rows_fn, start=start, chunk=16)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    ref = dense_masked_softmax(q, k, v, prof.mask_rows(0, torch.arange(start, S), S)[None].to(DEVICE), scale=16**-0.5)
    torch.testing.assert_close(a.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("score", ["mean", "bound"])
def test_block_summaries_kept_by_decode_steps_select_the_same_blocks(score):
    # A static cache filled one slot per step: update_block_summary keeps every completed block's
    # summary (sum, or maximum and minimum) exact, and select_blocks_one with it equals the
    # selection from the keys.
    from dam_kernels.dynamic import block_summary, select_blocks_one, update_block_summary

    g = torch.Generator().manual_seed(9)
    B, H, H_kv, D, block, slots = 1, 4, 2, 16, 16, 128
    k = torch.zeros(B, H_kv, slots, D)
    full = torch.randn(B, H_kv, slots, D, generator=g)
    k[:, :, :40] = full[:, :, :40]
    summ = block_summary(k, block, score)  # the eager step: every block once
    for n in range(41, 121):  # each step appends one key, then re-summarises its block
        k[:, :, n - 1] = full[:, :, n - 1]
        valid = torch.tensor([n])
        update_block_summary(summ, k, valid, block, score)
        done = (n - 1) // block  # blocks before the current one are whole
        torch.testing.assert_close(summ[:, :, :done], block_summary(full[:, :, : done * block], block, score),
                                   rtol=0, atol=1e-5)
        q = torch.randn(B, H, 1, D, generator=g)
        assert torch.equal(select_blocks_one(q, k, 0, 2, block, valid_len=valid, sums=summ, score=score),
                           select_blocks_one(q, k, 0, 2, block, valid_len=valid, score=score))


def test_tail_topk_hand_worked():
    # The case of test_select_blocks_hand_worked, three query blocks: with tail_topk the last
    # query block (rows 4, 5) gets its own budget, the others keep topk.
    q = torch.tensor([[[[0.0, 1], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0]]]], device=DEVICE)
    k = torch.tensor([[[[0.0, 1], [0, 1], [5, 0], [3, 0], [-1, 0], [0, 0]]]], device=DEVICE)
    wide = select_blocks(q, k, 0, 1, 2, tail_topk=2)
    assert wide[0, 0, 2].tolist() == [True, True, False]  # both earlier blocks
    assert wide[0, 0, 1].tolist() == [True, False, False]  # topk 1 as before
    none = select_blocks(q, k, 0, 1, 2, tail_topk=0)
    assert not none[0, 0, 2].any() and none[0, 0, 1].tolist() == [True, False, False]
    # The tail is the call's last block: rows 2..3 only (start 2, two rows) end in query block 1.
    part = select_blocks(q[:, :, 2:4], k[:, :, :4], 2, 0, 2, tail_topk=1)
    assert part[0, 0, 1].tolist() == [True, False] and not part[0, 0, 0].any()
    # tail_topk=None is topk everywhere.
    assert torch.equal(select_blocks(q, k, 0, 1, 2, tail_topk=None), select_blocks(q, k, 0, 1, 2))
    assert torch.equal(select_blocks(q, k, 0, 1, 2, tail_topk=1), select_blocks(q, k, 0, 1, 2))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("start", [0, 37])
def test_tail_topk_covering_every_block(backend, start):
    """topk 1 everywhere but the last query block, which sees static + every earlier block."""
    prof = random_profile(seed=7)
    B, H, H_kv, S, blk = 2, 4, 2, 70, 16
    q, k, v = random_qkv(B, H, H_kv, S, start, seed=11, device=DEVICE)
    out = sparse_attention(q, k, v, prof, 0, start=start, backend=backend, dynamic=DynamicSelection(1, blk, 99))
    rows = torch.arange(start, S)
    chosen = select_blocks(q, k, start, 1, blk)
    allowed = prof.mask_rows(0, rows, S).to(DEVICE) | dynamic_rows(chosen, rows, S, blk)
    i, j = rows[:, None], torch.arange(S)[None, :]
    last = (i // blk) == (S - 1) // blk
    allowed = allowed | (last & ((j // blk) < (i // blk)))[None].to(DEVICE)
    want = dense_masked_softmax(q, k, v, allowed, scale=16**-0.5)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    # Rows before the last block are exactly the plain top-1 result.
    plain = sparse_attention(q, k, v, prof, 0, start=start, backend=backend, dynamic=DynamicSelection(1, blk))
    before = (rows // blk) < (S - 1) // blk
    torch.testing.assert_close(out[:, :, before.to(DEVICE)], plain[:, :, before.to(DEVICE)], atol=2e-5, rtol=1e-4)
    assert (out[:, :, ~before.to(DEVICE)] - plain[:, :, ~before.to(DEVICE)]).abs().max() > 1e-3


@pytest.mark.parametrize("fields, flag, api", [
    (dict(topk=-1), "--dynamic-topk must be an integer from 0", "DynamicSelection.topk must be an integer from 0"),
    (dict(topk=2.5), "--dynamic-topk must be an integer", "DynamicSelection.topk must be an integer"),
    (dict(topk=10**30), r"--dynamic-topk must be an integer from 0 \(the dynamic part off\) to 2,147,483,647",
     r"DynamicSelection.topk must be an integer from 0 \(the dynamic part off\) to 2,147,483,647"),
    (dict(topk=4, block=50), "--dynamic-block must be a positive multiple of 16 up to 8192, got 50",
     "DynamicSelection.block must be a positive multiple of 16 up to 8192, got 50"),
    (dict(topk=4, block=0), "--dynamic-block must be a positive multiple of 16 up to 8192, got 0",
     "DynamicSelection.block must be a positive multiple of 16 up to 8192, got 0"),
    (dict(topk=4, block=10**12), "--dynamic-block must be a positive multiple of 16 up to 8192, got 1000000000000",
     "DynamicSelection.block must be a positive multiple of 16 up to 8192, got 1000000000000"),
    (dict(topk=0, tail_topk=4), "--dynamic-tail-topk needs --dynamic-topk > 0",
     "DynamicSelection.tail_topk needs DynamicSelection.topk > 0"),
    (dict(topk=2, tail_topk=-1), "--dynamic-tail-topk must be an integer from 0 to 2,147,483,647, got -1",
     "DynamicSelection.tail_topk must be an integer from 0 to 2,147,483,647, got -1"),
    (dict(topk=2, score="max"), "unknown --dynamic-score 'max': choose one of mean, bound",
     "unknown DynamicSelection.score 'max': choose one of mean, bound"),
])
def test_selection_validate_names_the_flag_or_the_field(fields, flag, api):
    sel = DynamicSelection(**fields)

    class Usage(Exception):
        pass

    with pytest.raises(Usage, match=f"^{flag}"):
        sel.validate(cli=True, error=Usage)
    with pytest.raises(ValueError, match=f"^{api}"):
        sel.validate()


def test_selection_defaults_and_what_it_reports():
    off = DynamicSelection()
    assert (off.topk, off.block, off.tail_topk, off.score) == (0, 128, None, "mean") and not off.on
    assert off.validate() is off
    assert DynamicSelection(0, 50).validate().block == 50  # the block does not matter while the part is off
    sel = DynamicSelection(topk=2, block=64)
    assert sel.on and sel.last_topk == 2
    assert sel.as_dict() == {"topk": 2, "block": 64, "tail_topk": 2, "score": "mean"}
    tail = DynamicSelection(topk=2, block=64, tail_topk=0, score="bound")
    assert tail.last_topk == 0 and tail.as_dict() == {"topk": 2, "block": 64, "tail_topk": 0, "score": "bound"}
