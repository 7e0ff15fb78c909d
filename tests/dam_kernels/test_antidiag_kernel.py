"""The Triton antidiagonal estimate (`dam_kernels.antidiag`) against its PyTorch reference
(`dam_kernels.block_mass.antidiag_block_mass`): small shapes in float32 and float16 (on the CPU through Triton's
interpreter, compiled on a GPU), on a GPU at a prompt's length in bf16, and `antidiag_select`'s dispatch to it on
CUDA."""

from __future__ import annotations

import pytest
import torch
from dam_kernels import antidiag
from dam_kernels.block_mass import antidiag_block_mass, antidiag_select
from helpers import KERNEL_DEVICE, needs_kernels, random_qkv

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_kernels
@pytest.mark.parametrize("S, start, stride, block, D, H, H_kv", [
    (70, 0, 4, 16, 16, 4, 2), (70, 37, 4, 16, 16, 4, 2), (64, 20, 2, 8, 16, 3, 1), (45, 0, 8, 16, 16, 2, 2),
    (300, 0, 16, 64, 64, 4, 2), (300, 130, 16, 64, 64, 2, 1), (200, 5, 8, 32, 96, 2, 2), (140, 64, 16, 16, 16, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_equals_the_reference(S, start, stride, block, D, H, H_kv, dtype):
    q, k, _ = random_qkv(2, H, H_kv, S, start, D, dtype=dtype, seed=S + start, amp=1.5, device=KERNEL_DEVICE)
    got = antidiag.antidiag_block_mass(q, k, start, block, stride)
    want = antidiag_block_mass(q.float(), k.float(), start, block, stride)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@needs_kernels
def test_kernel_sees_a_lone_needle_key():
    """One key far above the rest on a sampled antidiagonal: its block carries nearly all of the sampled rows'
    mass in the kernel as in the reference (a wrong row or key offset would put it elsewhere)."""
    S, block, stride = 256, 32, 8
    q, k, _ = random_qkv(1, 2, 1, S, 0, 16, seed=3, amp=0.1, device=KERNEL_DEVICE)
    k[0, 0, 71] = 40 * q[0, 0, 200] / q[0, 0, 200].norm()  # key 71 sampled by rows r with (r + 71) % 8 == 7
    got = antidiag.antidiag_block_mass(q, k, 0, block, stride)
    want = antidiag_block_mass(q, k, 0, block, stride)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    assert got[0, 0, 200 // block, 71 // block] > 0.1


def test_row_counts_are_the_rows_that_read_a_key():
    rows = antidiag.row_counts(5, 60, 65, 16, 8, "cpu")  # rows 5..64: blocks 0..4
    assert rows.tolist() == [11.0, 16.0, 16.0, 16.0, 1.0]  # rows 5..15 (first sampled key 7 - r % 8 <= r), 64 alone


def test_supports_cuda_tensors_and_power_of_two_tiles_only():
    q = torch.zeros(1, 1, 8, 64)
    assert not antidiag.supports(q, 64, 16)  # a CPU tensor: the torch reference
    assert not antidiag.supports(q.to(torch.int32), 64, 16)


@cuda
@pytest.mark.parametrize("D", [64, 128, 256])
def test_kernel_on_the_gpu_at_a_prompts_length(D):
    S, block, stride = 4096 + 77, 64, 16
    q, k, _ = random_qkv(1, 6, 2, S, 0, D, dtype=torch.bfloat16, seed=D, device="cuda")
    assert antidiag.supports(q, block, stride)
    got = antidiag.antidiag_block_mass(q, k, 0, block, stride)
    want = antidiag_block_mass(q.float(), k.float(), 0, block, stride)
    torch.testing.assert_close(got, want, rtol=0.02, atol=2e-4)  # bf16 products against float32 ones
    q32, k32 = q.float(), k.float()
    torch.testing.assert_close(antidiag.antidiag_block_mass(q32, k32, 0, block, stride), want, rtol=1e-4, atol=1e-6)


@cuda
def test_select_on_cuda_takes_the_kernel_and_chooses_as_the_reference():
    S, block = 2048 + 40, 64
    q, k, _ = random_qkv(1, 4, 2, S, 0, 64, seed=5, amp=1.5, device="cuda")
    got = antidiag_select(q, k, 0, block, 0.9, 8, stride=16, tail_mass=0.9, tail_cap=8)
    cpu = antidiag_select(q.cpu(), k.cpu(), 0, block, 0.9, 8, stride=16, tail_mass=0.9, tail_cap=8)
    agree = (got.cpu() == cpu).float().mean().item()
    assert agree > 0.999, agree  # float32 on both sides: only near-equal masses may order differently


@needs_kernels
@pytest.mark.parametrize("tiles", [{"bm": 32, "bn": 16, "warps": 4, "stages": 2},
                                   {"bm": 16, "bn": 64, "warps": 2, "stages": 1}])
def test_other_tile_settings_give_the_same_estimate(tiles):
    """`benchmarks/antidiag_speed.py` times other launch settings: each must give the default's numbers."""
    q, k, _ = random_qkv(1, 2, 1, 200, 0, 16, seed=9, amp=1.5, device=KERNEL_DEVICE)
    want = antidiag.antidiag_block_mass(q, k, 0, 16, 4)
    torch.testing.assert_close(antidiag.antidiag_block_mass(q, k, 0, 16, 4, tiles=tiles), want, rtol=1e-5, atol=2e-6)
    with pytest.raises(ValueError, match="must hold whole blocks of 4"):
        antidiag.antidiag_block_mass(q, k, 0, 16, 4, tiles={**tiles, "bm": 2})
