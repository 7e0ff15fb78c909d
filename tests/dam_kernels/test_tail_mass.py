"""The Triton tail mass (`dam_kernels.tail_mass`) against its PyTorch reference
(`dynamic.tail_block_mass_reference`): the exact attention mass per key block of a prompt's last rows, averaged
over the rows."""

from __future__ import annotations

import pytest
import torch
from dam_kernels import tail_mass
from dam_kernels.dynamic import tail_block_mass_reference
from helpers import KERNEL_DEVICE, gpu_only, needs_kernels, random_qkv


@needs_kernels
@pytest.mark.parametrize("H, H_kv", [(2, 2), (6, 2), (4, 1)])
@pytest.mark.parametrize("S, start, block", [(200, 136, 64), (200, 187, 64), (333, 300, 16), (70, 69, 64),
                                              (64, 0, 64)])
@pytest.mark.parametrize("window", [None, 40])
def test_equals_the_reference(H, H_kv, S, start, block, window):
    """Rows of one block or part of one, grouped heads, windows, a row tile across two query heads (G r > 64
    rows), a single row, keys ending inside a block: the reference's masses."""
    q, k, _ = random_qkv(1, H, H_kv, S, start, 32, dtype=torch.float32, seed=S + start, amp=1.5,
                         device=KERNEL_DEVICE)
    got = tail_mass.tail_block_mass(q, k, start, block, window=window)
    want = tail_block_mass_reference(q.cpu(), k.cpu(), start, block, window=window)
    assert got.shape == want.shape == (1, H, -(-S // block))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.sum(-1).cpu(), torch.ones(1, H))  # each row's masses add up to 1


@needs_kernels
@pytest.mark.parametrize("D, dtype", [(24, torch.float32), (16, torch.float16), (64, torch.float16)])
@pytest.mark.parametrize("stats_bytes", [1 << 28, 1])
def test_padded_head_dims_half_precision_batches_and_a_scale(monkeypatch, D, dtype, stats_bytes):
    """Batch rows together or one at a time (`STATS_BYTES`): the same masses."""
    monkeypatch.setattr(tail_mass, "STATS_BYTES", stats_bytes)
    q, k, _ = random_qkv(3, 4, 2, 150, 100, D, dtype=dtype, seed=D, device=KERNEL_DEVICE)
    got = tail_mass.tail_block_mass(q, k, 100, 32, scale=0.3)
    want = tail_block_mass_reference(q.cpu().float(), k.cpu().float(), 100, 32, scale=0.3)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)  # 2-byte products are exact in float32


@needs_kernels
def test_blocks_beyond_the_rows_and_left_of_the_window_hold_no_mass():
    """Keys past the last row (a cache longer than the call) and blocks wholly left of every row's window: 0."""
    q, k, _ = random_qkv(1, 2, 1, 400, 100, 32, dtype=torch.float32, seed=5, device=KERNEL_DEVICE)
    got = tail_mass.tail_block_mass(q[:, :, :20], k, 100, 32, window=50).cpu()
    assert (got[..., :1] == 0).all() and (got[..., 4:] == 0).all() and (got[..., 2:4] > 0).all()
    want = tail_block_mass_reference(q[:, :, :20].cpu(), k.cpu(), 100, 32, window=50)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_kernel_takes_only_cuda_rows_at_a_host_position():
    q = torch.zeros(1, 1, 4, 16)
    assert not tail_mass.supports(q, 0)  # a CPU tensor: the torch reference
    assert tail_mass.row_tile(q) == 64 and tail_mass.row_tile(torch.zeros(1, 1, 4, 256)) == 32
    assert tail_mass.row_tile(torch.zeros(1, 1, 4, 256, dtype=torch.bfloat16)) == 64


@gpu_only
@pytest.mark.parametrize("D, H, H_kv", [(64, 32, 8), (256, 4, 1)])
def test_on_the_gpu_at_a_prompts_length(D, H, H_kv):
    """A prompt's last block at 32K tokens in bf16, through `dynamic.tail_block_mass` (which takes the kernel on
    CUDA), against the reference's float32 scores on the same rows."""
    from dam_kernels import dynamic

    S, start = 32768 + 77, 32768 + 64
    q, k, _ = random_qkv(1, H, H_kv, S, start, D, dtype=torch.bfloat16, seed=D, device="cuda")
    got = dynamic.tail_block_mass(q, k, start, 64)
    assert tail_mass.supports(q, start)
    want = tail_block_mass_reference(q.cpu().float(), k.cpu().float(), start, 64)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-7)
