"""The CPU's block-sparse path (`dam_kernels.gathered`) against the exact reference (`reference_attention`).

Every case builds the reference's mask the way `sparse_attention` does on backend "reference" (the profile's
Stage-2 rows, united with the dynamic selection's cells when on) and asks the gathered path for the same
rows: static and dynamic masks, windows, soft-capping, grouped-query heads, decode rows, a start inside a
block, lengths that are not a multiple of the block and lengths beyond the profiled length, float32 with a
tight tolerance.
"""

from __future__ import annotations

import pytest
import torch
from dam_kernels.dynamic import dynamic_rows, select_blocks, select_blocks_one
from dam_kernels.gathered import additive_mask, block_tables, gathered_attention, kept_blocks
from dam_kernels.layout import device_masks
from dam_kernels.reference import reference_attention
from dam_kernels.selection import DynamicSelection
from helpers import random_profile, random_qkv

from dam_cli.runtime import attention

TOL = 4e-6  # float32: both sides accumulate in float32, in another order


def _chosen(q, k, start, dyn: DynamicSelection, window=None):
    return select_blocks(q, k, start, dyn.topk, dyn.block, tail_topk=dyn.tail_topk, score=dyn.score,
                         tail_mass=dyn.tail_mass, window=window)


def _reference(prof, q, k, v, start, chosen=None, block=0, **kw):
    def rows_fn(rows, n, k0=0):
        cells = prof.mask_rows(0, rows, n, k0)
        return cells if chosen is None else cells | dynamic_rows(chosen, rows, k0 + n, block)[..., k0:]

    return reference_attention(q, k, v, rows_fn, start=start, **kw)


def _gathered(prof, q, k, v, start, chosen=None, block=0, bm=64, bn=64, **kw):
    return gathered_attention(q, k, v, device_masks(prof, 0, "cpu"), start=start, chosen=chosen, dyn_block=block,
                              block_m=bm, block_n=bn, **kw)


def _max_err(a, b) -> float:
    assert a.dtype == b.dtype and a.shape == b.shape and not a.isnan().any()
    return (a.double() - b.double()).abs().max().item()


# L, S, start, H, H_kv, window, softcap, block_m, block_n
STATIC_CASES = [
    (16, 100, 0, 4, 2, None, None, 64, 64),  # beyond the profiled length, S not a multiple of the block
    (16, 100, 37, 4, 2, None, None, 64, 64),  # start inside a block
    (40, 300, 0, 4, 1, None, None, 32, 32),  # four query heads on one kv head
    (40, 300, 130, 4, 4, None, None, 16, 16),  # no grouping; 16-key blocks are sub-words
    (300, 200, 0, 4, 2, None, None, 64, 64),  # shorter than the profiled length
    (130, 400, 11, 3, 1, None, None, 64, 64),  # L past two words (bit 63 in use), not a multiple of 64
    (40, 300, 0, 4, 2, 50, None, 64, 64),  # sliding window
    (40, 300, 120, 4, 2, 17, None, 32, 32),
    (40, 300, 0, 4, 2, None, 3.0, 64, 64),  # soft-capping
    (40, 300, 64, 4, 2, 50, 2.0, 128, 64),  # both; query blocks of two key blocks
]


@pytest.mark.parametrize("L, S, start, H, H_kv, window, softcap, bm, bn", STATIC_CASES)
def test_static_mask_equals_the_reference(L, S, start, H, H_kv, window, softcap, bm, bn):
    prof = random_profile(1, H, L, p_m=0.3, p_r=0.1, p_c=0.05, seed=S + start)
    q, k, v = random_qkv(1, H, H_kv, S, start, D=16, seed=1, amp=2.0)
    want = _reference(prof, q, k, v, start, window=window, softcap=softcap)
    got = _gathered(prof, q, k, v, start, bm=bm, bn=bn, window=window, softcap=softcap)
    assert _max_err(got, want) <= TOL
    if window is not None:  # the case bites: the window changes the answer
        assert _max_err(_reference(prof, q, k, v, start, softcap=softcap), want) > 1e-2


# L, S, start, selection (topk, block, tail_topk, tail_mass, score), window, softcap, block_m, block_n
DYNAMIC_CASES = [
    (40, 300, 0, (2, 64, 3, None, "mean"), None, None, 64, 64),
    (40, 300, 37, (2, 64, 5, 0.8, "mean"), None, None, 64, 64),  # the exact-mass rule on the tail block
    (16, 300, 0, (3, 32, None, None, "bound"), None, None, 32, 32),
    (40, 800, 0, (2, 128, 4, 0.9, "mean"), None, None, 128, 64),  # selection blocks of two key blocks
    (40, 300, 0, (2, 48, 2, None, "mean"), None, None, 48, 16),  # a block that is no power of two
    (40, 300, 100, (3, 32, 3, None, "mean"), 40, None, 32, 32),  # selected blocks cut by the window
    (40, 300, 0, (2, 64, 3, 0.7, "mean"), None, 2.5, 64, 64),
    (40, 300, 0, (2, 64, 3, 0.5, "antidiag"), None, None, 64, 64),  # blocks by estimated mass
    (40, 300, 100, (3, 32, 2, 0.8, "antidiag"), None, None, 32, 32),
    (40, 300, 37, (2, 64, 3, 0.6, "antisum"), None, None, 64, 64),  # XAttention's summed estimate
]


@pytest.mark.parametrize("L, S, start, sel, window, softcap, bm, bn", DYNAMIC_CASES)
def test_dynamic_selection_equals_the_reference(L, S, start, sel, window, softcap, bm, bn):
    topk, block, tail_topk, tail_mass, score = sel
    dyn = DynamicSelection(topk, block, tail_topk, score=score, tail_mass=tail_mass).validate()
    prof = random_profile(1, 4, L, p_m=0.3, p_r=0.1, p_c=0.05, seed=S)
    q, k, v = random_qkv(2, 4, 2, S, start, D=16, seed=2, amp=2.0)  # two batch rows: two selections
    chosen = _chosen(q, k, start, dyn)
    assert not torch.equal(chosen[0], chosen[1]) and chosen.any()
    want = _reference(prof, q, k, v, start, chosen, dyn.block, window=window, softcap=softcap)
    got = _gathered(prof, q, k, v, start, chosen, dyn.block, bm=bm, bn=bn, window=window, softcap=softcap)
    assert _max_err(got, want) <= TOL


@pytest.mark.parametrize("start, Sq", [(299, 1), (290, 3), (64, 1), (10, 2)])
@pytest.mark.parametrize("window", [None, 30])
@pytest.mark.parametrize("dynamic", [False, True])
def test_decode_rows_equal_the_reference(start, Sq, window, dynamic):
    prof = random_profile(1, 4, 40, p_m=0.3, p_r=0.1, p_c=0.05, seed=start)
    q, k, v = random_qkv(1, 4, 2, start + Sq, start, D=16, seed=3, amp=2.0)
    dyn = DynamicSelection(2, 32, 4, tail_mass=0.8).validate() if dynamic else None
    chosen = _chosen(q, k, start, dyn, window) if dynamic else None
    want = _reference(prof, q, k, v, start, chosen, dyn.block if dynamic else 0, window=window)
    got = _gathered(prof, q, k, v, start, chosen, dyn.block if dynamic else 0, bm=32, bn=32, window=window)
    assert _max_err(got, want) <= TOL
    if dynamic:  # the one-block selection of a decode step, and the same chosen from the attention's scores
        one = select_blocks_one(q, k, start, dyn.last_topk, dyn.block, tail_mass=dyn.tail_mass, window=window)
        got_one = _gathered(prof, q, k, v, start, one, dyn.block, bm=32, bn=32, window=window)
        assert _max_err(got_one, want) <= TOL
        by_mass = _gathered(prof, q, k, v, start, None, dyn.block, bm=32, bn=32, window=window,
                            by_mass=(dyn.tail_mass, dyn.last_topk))
        assert _max_err(by_mass, want) <= TOL


def test_a_cut_cache_under_a_window_equals_the_reference():
    prof = random_profile(1, 4, 16, p_m=0.4, p_r=0.3, p_c=0.2, seed=7)
    start, Sq, window = 150, 70, 40
    key_start = start - window + 1  # the cache kept only the keys the window reaches
    q, k, v = random_qkv(1, 4, 2, start + Sq, start, D=16, seed=4)
    k, v = k[:, :, key_start:], v[:, :, key_start:]
    want = _reference(prof, q, k, v, start, window=window, key_start=key_start)
    got = _gathered(prof, q, k, v, start, bm=32, bn=32, window=window, key_start=key_start)
    assert _max_err(got, want) <= TOL


@pytest.mark.parametrize("start", [700, 731, 767])
def test_a_cut_cache_chooses_by_mass_the_blocks_of_the_whole_cache(start):
    """A window's cache cut inside a block (transformers' sliding layers keep the last W - 1 keys): the exact-mass
    rule counts blocks by absolute position, as on the whole cache (it once counted them from the cut)."""
    prof = random_profile(1, 4, 16, seed=start)
    q, k, v = random_qkv(1, 4, 1, start + 1, start, D=32, seed=5, amp=2.5)
    window = 200
    ks = start - window + 1
    whole = _gathered(prof, q, k, v, start, None, 64, bm=64, bn=64, window=window, by_mass=(0.6, 2))
    cut = _gathered(prof, q, k[:, :, ks:], v[:, :, ks:], start, None, 64, bm=64, bn=64, window=window,
                    key_start=ks, by_mass=(0.6, 2))
    static = _gathered(prof, q, k, v, start, None, 0, bm=64, bn=64, window=window)
    assert _max_err(cut, whole) <= TOL and _max_err(static, whole) > 1e-3  # the case bites: blocks were chosen


def test_bfloat16_inputs_accumulate_in_float32():
    prof = random_profile(1, 4, 40, seed=8)
    q, k, v = random_qkv(1, 4, 2, 200, 0, D=16, seed=5, dtype=torch.bfloat16)
    want = _reference(prof, q, k, v, 0)
    got = _gathered(prof, q, k, v, 0)
    assert got.dtype == torch.bfloat16 and _max_err(got, want) <= 1e-2


@pytest.mark.parametrize("S, start, bm, bn", [(320, 0, 64, 64), (300, 37, 32, 16), (200, 0, 128, 64)])
def test_kept_blocks_hold_every_allowed_pair(S, start, bm, bn):
    # Exactly the blocks holding an allowed pair when the call holds whole blocks from 0, a superset otherwise.
    prof = random_profile(1, 3, 70, p_m=0.2, p_r=0.05, p_c=0.03, seed=S)
    masks = device_masks(prof, 0, "cpu")
    nq, nk = -(-S // bm), -(-S // bn)
    allowed = torch.zeros(3, nq * bm, nk * bn, dtype=torch.bool)
    allowed[:, start:S, :S] = prof.mask(0, S)[:, start:]
    exact = allowed.view(3, nq, bm, nk, bn).any(4).any(2)[:, start // bm:]
    got = kept_blocks(masks, block_tables(masks, bm, bn), torch.arange(3), torch.arange(start // bm, nq), start,
                      S - start, S, bm, bn, None)
    assert not (exact & ~got).any()
    if start == 0 and S % bm == 0:
        assert torch.equal(got, exact)


def test_additive_mask_expands_every_bit():
    words = torch.randint(-(2**62), 2**62, (3, 5, 4)) * 2 + torch.randint(0, 2, (3, 5, 4))
    bits = (words[..., None] >> torch.arange(64)) & 1
    for bn in (16, 32, 64):
        want = torch.where(bits[..., :bn] == 1, 0.0, float("-inf")).reshape(3, 5, 4 * bn)
        assert torch.equal(additive_mask(words, bn), want)


def test_block_sizes_tile_the_selection_block():
    for blk, want in [(None, (64, 64)), (16, (16, 16)), (48, (48, 16)), (64, (64, 64)), (96, (96, 32)),
                      (256, (128, 64)), (1024, (128, 64))]:
        bm, bn = attention.gathered_blocks(blk)
        assert (bm, bn) == want
        assert blk is None or (blk % bm == 0 and blk % bn == 0)


# ---- through sparse_attention ------------------------------------------------------------------
@pytest.mark.parametrize("start, Sq", [(0, 300), (250, 50), (299, 1)])
def test_sparse_attention_gathered_equals_reference_with_retrieval_heads(start, Sq):
    full = torch.tensor([[False, True, False, False, False, False]])
    prof = random_profile(1, 6, 40, p_m=0.3, p_r=0.1, p_c=0.05, seed=9, full_heads=full)
    q, k, v = random_qkv(1, 6, 2, start + Sq, start, D=16, seed=6, amp=2.0)
    dyn = DynamicSelection(2, 64, 4, tail_mass=0.8)
    for d in (None, dyn, DynamicSelection(3, 64, 4, score="antidiag", tail_mass=0.8)):
        want = attention.sparse_attention(q, k, v, prof, 0, start=start, backend="reference", dynamic=d)
        got = attention.sparse_attention(q, k, v, prof, 0, start=start, backend="gathered", dynamic=d)
        assert _max_err(got, want) <= TOL


def test_auto_runs_the_gathered_path_on_the_cpu_without_the_compiled_kernel(monkeypatch):
    import dam_kernels.cpu_sparse as cpu_sparse
    import dam_kernels.gathered as gathered

    monkeypatch.setattr(cpu_sparse, "_STATE", {"lib": None, "why": "no C compiler (test)"})
    calls = []
    real = gathered.gathered_attention
    monkeypatch.setattr(gathered, "gathered_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    prof = random_profile(1, 4, 16, seed=10)
    q, k, v = random_qkv(1, 4, 2, 90, 0, D=16, seed=7)
    got = attention.sparse_attention(q, k, v, prof, 0)
    assert calls and "gathered" in attention.BACKENDS
    assert _max_err(got, attention.sparse_attention(q, k, v, prof, 0, backend="reference")) <= TOL


def test_gradients_go_to_the_reference(monkeypatch):
    import dam_kernels.gathered as gathered

    monkeypatch.setattr(gathered._SCRATCH, "bufs", {}, raising=False)  # made afresh under inference_mode below
    prof = random_profile(1, 4, 16, seed=11)
    q, k, v = random_qkv(1, 4, 2, 90, 0, D=16, seed=8)
    q.requires_grad_()
    out = attention.sparse_attention(q, k, v, prof, 0)  # auto: the reference, which has gradients
    out.sum().backward()
    assert q.grad is not None
    with pytest.raises(attention.DamError, match="no gradients"):
        attention.sparse_attention(q, k, v, prof, 0, backend="gathered")
    with torch.inference_mode():  # scratch buffers made here stay writable outside
        a = attention.sparse_attention(q, k, v, prof, 0, backend="gathered")
    with torch.no_grad():
        assert _max_err(attention.sparse_attention(q, k, v, prof, 0, backend="gathered"), a) == 0


@pytest.mark.parametrize("start, Sq", [(0, 300), (37, 263)])
def test_queries_in_the_models_layout_and_retrieval_heads_left_out(start, Sq):
    # q as transformers hands it over (a transposed view of [B, S, H, D], read in place), retrieval heads (two of
    # one kv head, one of another) left out of the items: zero rows here, every other head equal to the reference.
    full = torch.tensor([False, True, True, False, False, True])
    prof = random_profile(1, 6, 40, p_m=0.3, p_r=0.1, p_c=0.05, seed=12)
    q, k, v = random_qkv(1, 6, 2, start + Sq, start, D=16, seed=9, amp=2.0)
    q_model = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_model.is_contiguous() and torch.equal(q_model, q)
    dyn = DynamicSelection(2, 64, 4).validate()
    chosen = _chosen(q, k, start, dyn)
    want = _reference(prof, q, k, v, start, chosen, dyn.block)
    got = _gathered(prof, q_model, k, v, start, chosen, dyn.block, full_heads=full)
    assert torch.equal(got[:, full], torch.zeros_like(got[:, full]))
    assert _max_err(got[:, ~full], want[:, ~full]) <= TOL


def test_the_load_is_read_once_a_second_and_a_busy_machine_runs_one_thread(monkeypatch):
    """`one_thread_when_busy` reads the machine's load at most once every `BUSY_RECHECK_S` (a decode step enters it
    once a layer) and, when other work fills the cores, runs the body on one thread."""
    import dam_kernels.gathered as gathered

    reads = []
    monkeypatch.setattr(gathered, "_load_busy", lambda: reads.append(1) or True)
    monkeypatch.setattr(gathered, "_BUSY", [float("-inf"), False])
    before = torch.get_num_threads()
    for _ in range(30):
        with gathered.one_thread_when_busy():
            inside = torch.get_num_threads()
    assert len(reads) == 1 and torch.get_num_threads() == before
    assert inside == 1 or before == 1
    monkeypatch.setattr(gathered, "_BUSY", [float("-inf"), False])  # a new reading once the time has passed
    with gathered.one_thread_when_busy():
        pass
    assert len(reads) == 2
