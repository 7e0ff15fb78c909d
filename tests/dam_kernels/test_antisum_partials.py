"""The summed estimate with each product taken once (`dam_kernels.antisum_partials`: partial masses per key tile,
merged) against its PyTorch reference (`dam_kernels.block_mass.antisum_block_mass`) and the two-pass kernel: small
shapes in float32 and float16 (on the CPU through Triton's interpreter, compiled on a GPU), key tiles split over
programs or not, heads in chunks, and on a GPU at a prompt's length in bf16."""

from __future__ import annotations

import pytest
import torch
from dam_kernels import antisum, antisum_partials
from dam_kernels.block_mass import antisum_block_mass
from helpers import ANTISUM_SHAPES as SHAPES
from helpers import KERNEL_DEVICE, needs_kernels, random_qkv

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_kernels
@pytest.mark.parametrize("S, start, stride, block, D, H, H_kv", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_pass_equals_the_reference(S, start, stride, block, D, H, H_kv, dtype):
    q, k, _ = random_qkv(2, H, H_kv, S, start, D, dtype=dtype, seed=S + start, amp=1.5, device=KERNEL_DEVICE)
    got = antisum_partials.antisum_block_mass(q, k, start, block, stride)
    want = antisum_block_mass(q.float().cpu(), k.float().cpu(), start, block, stride)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=2e-6)


@needs_kernels
@pytest.mark.parametrize("programs, partial_bytes", [(1, 1 << 30), (1 << 20, 1 << 30), (1, 1), (64, 40_000)])
@pytest.mark.parametrize("tiles", [None, {"bm": 32, "bn": 16, "grouped": False}, {"bm": 16, "bn": 64, "grouped": True},
                                   {"bm": 32, "bn": 32, "grouped": False, "bk": 16},
                                   {"bm": 16, "bn": 32, "grouped": False, "bk": 16, "flat": True}])
def test_key_splits_head_chunks_and_tiles_change_nothing(monkeypatch, programs, partial_bytes, tiles):
    """One program per row tile (no split), one per key tile, one head per launch or a few: the same estimate.
    A row group's key tiles then come from several programs, each with its own maximum, merged after. The same with
    the products in chunks (`bk`), in one loop over key tiles and chunks (`flat`)."""
    monkeypatch.setattr(antisum_partials, "TARGET_PROGRAMS", programs)
    monkeypatch.setattr(antisum_partials, "PARTIAL_BYTES", partial_bytes)
    q, k, _ = random_qkv(1, 4, 2, 330, 70, 32, dtype=torch.float32, seed=7, amp=2.0, device=KERNEL_DEVICE)
    got = antisum_partials.antisum_block_mass(q, k, 70, 64, 8, tiles=tiles)
    want = antisum_block_mass(q.cpu(), k.cpu(), 70, 64, 8)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=2e-6)


@needs_kernels
def test_the_dispatcher_takes_one_pass_unless_told_or_sampling_row_groups(monkeypatch):
    """`antisum.antisum_block_mass` runs the partials by default (`ONE_PASS`), the two passes with `one_pass=False`
    or with `row_step` > 1 (the two-pass kernel's alone): all three give the reference's estimate."""
    calls = []
    real = antisum_partials.antisum_block_mass
    monkeypatch.setattr(antisum_partials, "antisum_block_mass", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, _ = random_qkv(1, 2, 1, 200, 0, 16, dtype=torch.float32, seed=3, device=KERNEL_DEVICE)
    want = antisum_block_mass(q.cpu(), k.cpu(), 0, 64, 8)
    assert antisum.ONE_PASS
    for kw in ({}, {"one_pass": False}):
        torch.testing.assert_close(antisum.antisum_block_mass(q, k, 0, 64, 8, **kw).cpu(), want, rtol=1e-5, atol=2e-6)
    assert calls == [1]
    antisum.antisum_block_mass(q, k, 0, 64, 8, row_step=2)
    assert calls == [1]


def test_head_chunks_and_key_splits():
    assert antisum_partials.head_chunk(32, 16384, 2048) == (1 << 30) // (4 * 16384 * 2048) == 8
    assert antisum_partials.head_chunk(4, 4096, 512) == 4 and antisum_partials.head_chunk(8, 10**6, 10**6) == 1
    assert antisum_partials.key_splits(8192, 128) == 1  # enough row tiles: each program walks its whole row
    assert antisum_partials.key_splits(512, 64) == 4 and antisum_partials.key_splits(1, 3) == 3


@cuda
@pytest.mark.parametrize("D, H, H_kv", [(64, 8, 2), (256, 4, 1)])
def test_one_pass_on_the_gpu_at_a_prompts_length(D, H, H_kv):
    S, block, stride = 8192 + 77, 64, 8  # the shipped group size (ANTISUM_STRIDE)
    q, k, _ = random_qkv(1, H, H_kv, S, 0, D, dtype=torch.bfloat16, seed=D, device="cuda")
    got = antisum_partials.antisum_block_mass(q, k, 0, block, stride)
    two = antisum.antisum_block_mass(q, k, 0, block, stride, one_pass=False)
    want = antisum_block_mass(q.float(), k.float(), 0, block, stride)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)  # bf16 products against float32
    torch.testing.assert_close(got, two, rtol=1e-4, atol=1e-6)  # the same products, merged otherwise


@needs_kernels
@pytest.mark.parametrize("D", [24, 48])
@pytest.mark.parametrize("flat", [False, True])
def test_a_whole_row_offset_a_step_pads_the_head_dim(D, flat):
    """Without a chunk (`bk`) each step takes a whole row offset, its head dim padded to a power of two (the padding
    lanes load zeros), in the walk by key tile or in the flat loop: the reference's estimate."""
    q, k, _ = random_qkv(1, 4, 2, 300, 40, D, dtype=torch.float32, seed=D, amp=1.5, device=KERNEL_DEVICE)
    assert antisum.launch_setting(q, {"grouped": False}, 8, 8, 8)[4:6] == (32 if D == 24 else 64,) * 2
    got = antisum_partials.antisum_block_mass(q, k, 40, 64, 8, tiles={"bm": 16, "bn": 32, "grouped": False,
                                                                       "flat": flat})
    want = antisum_block_mass(q.cpu(), k.cpu(), 40, 64, 8)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=2e-6)
