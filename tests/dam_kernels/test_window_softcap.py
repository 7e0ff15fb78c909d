"""Sliding windows and logit soft-capping: the reference and the Triton kernels against a float64 oracle.

The oracle is a dense masked softmax over an explicit mask: the Stage-2 rows of the profile AND
`i - j < W` AND `j <= i` (transformers' `sliding_window_overlay` with the causal mask), with
scores `c * tanh(s / c)` when soft-capped. On the CPU the kernels run in the Triton interpreter.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from dam_kernels.decode import dam_decode  # noqa: E402
from dam_kernels.layout import device_masks, layout_for  # noqa: E402
from dam_kernels.prefill import dam_prefill  # noqa: E402
from dam_kernels.reference import reference_attention  # noqa: E402
from helpers import (  # noqa: E402
    KERNEL_DTYPES,
    check_against_oracle,
    dense_masked_softmax,
    half_dense_profile,
    mask_rows_fn,
    needs_kernels,
    on_device,
    random_profile,
    random_qkv,
    window_mask,
)


# ---- reference -----------------------------------------------------------------------------
@pytest.mark.parametrize("window,softcap", [(5, None), (None, 2.0), (7, 2.0), (1, None), (100, 3.0)])
@pytest.mark.parametrize("key_span", [None, 16])
def test_reference_window_softcap(window, softcap, key_span):
    prof = random_profile(p_m=0.4, p_r=0.3, p_c=0.2, seed=3)
    S, start = 45, 0
    q, k, v = random_qkv(2, 4, 2, S, start, 16, seed=1, amp=2.0)
    allowed = window_mask(prof, torch.arange(start, S), S, 0, window)
    want = dense_masked_softmax(q, k, v, allowed, softcap=softcap, device="cpu")
    # chunk 8: Sq is not a multiple of the chunk, and chunks start on both sides of L and W
    got = reference_attention(q, k, v, mask_rows_fn(prof), start=start, chunk=8, key_span=key_span,
                              window=window, softcap=softcap)
    assert (got.double() - want).abs().max().item() < 1e-5
    # the case bites: without the window / cap the answer is another one
    plain = dense_masked_softmax(q, k, v, window_mask(prof, torch.arange(start, S), S), softcap=None, device="cpu")
    assert (plain - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("start,window", [(30, 6), (30, 31), (12, 4), (40, 1)])
def test_reference_key_start_with_window(start, window):
    # A cache that kept only the last W - 1 keys before the chunk (transformers' sliding layer).
    prof = random_profile(p_m=0.4, p_r=0.3, p_c=0.2, seed=5)
    S = start + 9
    key_start = max(0, start - (window - 1))
    q, k, v = random_qkv(1, 4, 1, S, start, 16, seed=start)
    allowed = window_mask(prof, torch.arange(start, S), S, 0, window)
    want = dense_masked_softmax(q, k, v, allowed, softcap=2.5, device="cpu")
    got = reference_attention(q, k[:, :, key_start:], v[:, :, key_start:], mask_rows_fn(prof), start=start,
                              chunk=4, window=window, softcap=2.5, key_start=key_start)
    assert (got.double() - want).abs().max().item() < 1e-5


def test_reference_defaults_unchanged():
    prof = random_profile(p_m=0.4, p_r=0.3, p_c=0.2, seed=9)
    q, k, v = random_qkv(2, 4, 2, 37, 17, 16, seed=9)
    want = dense_masked_softmax(q, k, v, window_mask(prof, torch.arange(17, 37), 37), device="cpu")
    for key_span in (None, 16):
        got = reference_attention(q, k, v, mask_rows_fn(prof), start=17, chunk=8, key_span=key_span)
        assert (got.double() - want).abs().max().item() < 1e-5


def test_reference_refuses_missing_keys():
    prof = random_profile(p_m=0.4, p_r=0.3, p_c=0.2)
    q, k, v = random_qkv(1, 4, 2, 10, 6, 16)
    with pytest.raises(ValueError, match="missing"):  # no window: row 20 may attend keys below 10
        reference_attention(q, k, v, mask_rows_fn(prof), start=20, key_start=10)
    with pytest.raises(ValueError, match="missing"):  # the window reaches key 20 - 12 + 1 = 9 < 10
        reference_attention(q, k, v, mask_rows_fn(prof), start=20, key_start=10, window=12)
    with pytest.raises(ValueError, match="window"):
        reference_attention(q, k, v, mask_rows_fn(prof), start=20, window=0)


# ---- Triton prefill ------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("window", [5, 16, 23, 32])  # below a block, at one, between, at two (blocks 16)
def test_prefill_window(window, dtype):
    prof = half_dense_profile(seed=window)
    S = 45  # not a multiple of the blocks
    q, k, v = on_device(*random_qkv(2, 4, 2, S, 0, 16, dtype=dtype, seed=window))
    masks = device_masks(prof, 0, q.device)
    cut = layout_for(prof, 0, S, 16, 16, q.device, window=window)
    # the windowed layout drops blocks left of the window and keeps no full block crossing it
    kept, full = cut.to_dense()
    qb, kb = torch.meshgrid(torch.arange(kept.shape[1]), torch.arange(kept.shape[2]), indexing="ij")
    assert not (kept.cpu() & (qb * 16 - (kb * 16 + 15) >= window)).any()
    assert not (full.cpu() & (qb * 16 + 15 - kb * 16 >= window)).any()
    out = dam_prefill(q, k, v, masks, cut, start=0, scale=16**-0.5, window=window)
    check_against_oracle(out, q, k, v, prof, 0, window, label=f"W={window} {dtype}")
    # an unwindowed layout (full blocks across the window's edge) gives the same answer
    whole = layout_for(prof, 0, S, 16, 16, q.device)
    assert bool((whole.to_dense()[1].cpu() & (qb * 16 + 15 - kb * 16 >= window)).any())
    out2 = dam_prefill(q, k, v, masks, whole, start=0, scale=16**-0.5, window=window)
    check_against_oracle(out2, q, k, v, prof, 0, window, label=f"W={window} {dtype} whole layout")


@needs_kernels
@pytest.mark.parametrize("window,softcap,start", [(None, 1.5, 0), (7, 2.0, 0), (20, 1.0, 21), (9, None, 30)])
def test_prefill_softcap_and_chunks(window, softcap, start):
    prof = random_profile(p_m=0.4, p_r=0.3, p_c=0.2, heads=6, seed=start)
    S = 53
    q, k, v = on_device(*random_qkv(1, 6, 2, S, start, 16, dtype=torch.float32, seed=start, amp=2.0))
    lay = layout_for(prof, 0, S, 16, 32, q.device, window=window)
    out = dam_prefill(q, k, v, device_masks(prof, 0, q.device), lay, start=start, scale=16**-0.5,
                      window=window, softcap=softcap)
    check_against_oracle(out, q, k, v, prof, start, window, softcap, label=f"W={window} cap={softcap} start={start}")


@needs_kernels
def test_prefill_refuses_layout_of_another_window():
    prof = random_profile(p_m=0.4, p_r=0.3, p_c=0.2)
    q, k, v = on_device(*random_qkv(1, 4, 2, 20, 0, 16, dtype=torch.float16))
    lay = layout_for(prof, 0, 20, 16, 16, q.device, window=4)
    with pytest.raises(AssertionError, match="window 4"):
        dam_prefill(q, k, v, device_masks(prof, 0, q.device), lay, start=0, scale=0.25, window=8)


# ---- Triton decode -------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("t,window,Sq", [(40, 5, 1), (40, 16, 1), (77, 23, 3), (77, 70, 2), (10, 4, 1)])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_decode_window(t, window, Sq, softcap):
    prof = random_profile(p_m=0.4, p_r=0.3, p_c=0.2, seed=t)
    S = t + Sq
    q, k, v = on_device(*random_qkv(2, 4, 2, S, S - Sq, 16, dtype=torch.float16, seed=window, amp=1.5))
    out = dam_decode(q, k, v, device_masks(prof, 0, q.device), start=t, scale=0.25, block_n=16,
                     window=window, softcap=softcap)
    check_against_oracle(out, q, k, v, prof, t, window, softcap, label=f"t={t} W={window} Sq={Sq} cap={softcap}")


@needs_kernels
def test_decode_window_static_cache():
    # A static cache (valid_len on the device): the kernel cuts the candidates to the window itself.
    prof = random_profile(p_m=0.4, p_r=0.3, p_c=0.2, seed=4)
    n_valid, window = 61, 9
    q, k, v = on_device(*random_qkv(1, 4, 2, 80, 79, 16, dtype=torch.float32, seed=4))
    valid = torch.tensor([n_valid], dtype=torch.int64, device=q.device)
    out = dam_decode(q, k, v, device_masks(prof, 0, q.device), start=0, scale=0.25, block_n=16,
                     valid_len=valid, window=window, softcap=3.0)
    check_against_oracle(out, q, k[:, :, :n_valid], v[:, :, :n_valid], prof, n_valid - 1, window, 3.0,
                         label="static cache")


# ---- the dynamic part under a window -------------------------------------------------------
@needs_kernels
def test_window_with_dynamic_blocks():
    # Selected blocks join as full blocks anywhere (dynamic.merge_layout) or as extra decode
    # candidates; the window still applies: allowed = (Stage-2 | selected causal pairs) AND window.
    from dam_kernels.dynamic import dynamic_rows, merge_layout, select_blocks, select_blocks_one

    prof = random_profile(p_m=0.4, p_r=0.3, p_c=0.2, seed=13)
    S, start, window, blk = 80, 0, 20, 16
    q, k, v = on_device(*random_qkv(2, 4, 2, S, 0, 16, dtype=torch.float32, seed=13))
    rows = torch.arange(S)
    chosen = select_blocks(q, k, start, 2, blk)
    band = (rows[:, None] - torch.arange(S)[None, :] < window)
    allowed = (prof.mask_rows(0, rows, S) | dynamic_rows(chosen, rows, S, blk).cpu()) & band
    want = dense_masked_softmax(q, k, v, allowed, device="cpu")
    masks = device_masks(prof, 0, q.device)
    lay = layout_for(prof, 0, S, blk, 16, q.device, window=window)
    for b in range(2):
        merged = merge_layout(lay, chosen[b], blk)
        out = dam_prefill(q[b : b + 1], k[b : b + 1], v[b : b + 1], masks, merged, start=0, scale=0.25,
                          window=window)
        assert (out.double().cpu() - want[b : b + 1]).abs().max().item() < 1e-5
    # decode: one row at the end, its selection as extra candidates
    t = S - 1
    one = select_blocks_one(q[:, :, t:], k, t, 2, blk)
    picked = one.cpu()[:, :, None, torch.arange(S) // blk]  # [B, H, 1, S]: row t's selected keys (all <= t)
    allowed1 = (prof.mask_rows(0, rows[t:], S) | picked) & band[t:]
    out = dam_decode(q[:, :, t:], k, v, masks, start=t, scale=0.25, block_n=16, dyn=one, dyn_block=blk,
                     max_extra=8, window=window)
    want1 = dense_masked_softmax(q[:, :, t:], k, v, allowed1, device="cpu")
    assert (out.double().cpu() - want1).abs().max().item() < 1e-5
