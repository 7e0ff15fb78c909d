"""The Triton summed-antidiagonal estimate (`dam_kernels.antisum`) against its PyTorch reference
(`dam_kernels.block_mass.antisum_block_mass`): small shapes in float32 and float16 (on the CPU through Triton's
interpreter, compiled on a GPU), and on a GPU at a prompt's length in bf16."""

from __future__ import annotations

import pytest
import torch
from dam_kernels import antisum
from dam_kernels.block_mass import antisum_block_mass
from helpers import ANTISUM_SHAPES as SHAPES
from helpers import KERNEL_DEVICE, needs_kernels, random_qkv

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_kernels
@pytest.mark.parametrize("S, start, stride, block, D, H, H_kv", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("one_pass", [True, False])
def test_kernel_equals_the_reference(S, start, stride, block, D, H, H_kv, dtype, one_pass):
    q, k, _ = random_qkv(2, H, H_kv, S, start, D, dtype=dtype, seed=S + start, amp=1.5, device=KERNEL_DEVICE)
    got = antisum.antisum_block_mass(q, k, start, block, stride, one_pass=one_pass)
    want = antisum_block_mass(q.float().cpu(), k.float().cpu(), start, block, stride)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=2e-6)


@needs_kernels
@pytest.mark.parametrize("tiles", [
    {"grouped": True}, {"grouped": False}, {"bm": 32, "bn": 32, "grouped": True}, {"bm": 32, "bn": 128},
    {"bm": 128, "bn": 16, "grouped": False}, {"bm": 32, "bn": 32, "grouped": False, "bk": 16},
    {"bm": 64, "bn": 16, "grouped": False, "bk": 16}])
@pytest.mark.parametrize("S, start, D", [(300, 0, 16), (300, 130, 32)])
def test_both_paths_and_every_tile_setting_give_the_reference(tiles, S, start, D):
    """A tile of row groups loaded once (one product `stride * D` deep per key tile), one row offset at a time or
    `bk` dims of one a step, and any tile sizes: the same estimate (the two passes here; `test_antisum_partials.py`
    the one pass)."""
    q, k, _ = random_qkv(1, 4, 2, S, start, D, dtype=torch.float32, seed=S + D, amp=1.5, device=KERNEL_DEVICE)
    assert antisum.grouped(64, 8, D)
    got = antisum.antisum_block_mass(q, k, start, 64, 8, tiles=tiles, one_pass=False)
    want = antisum_block_mass(q.float().cpu(), k.float().cpu(), start, 64, 8)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("bk", [8, 24, 64])
def test_a_chunk_must_be_a_power_of_two_dividing_the_head_dim(bk):
    with pytest.raises(ValueError, match=f"bk={bk} must be a power of two"):
        antisum.launch_setting(torch.zeros(1, 1, 8, 32), {"bk": bk}, 8, 8, 8)
    assert antisum.launch_setting(torch.zeros(1, 1, 8, 96), {"bk": 32}, 8, 8, 8)[4:6] == (32, 96)
    assert antisum.launch_setting(torch.zeros(1, 1, 8, 96), {}, 8, 8, 8)[4:6] == (128, 128)  # a whole row offset


def test_supports_cuda_tensors_and_power_of_two_tiles_only():
    assert antisum.grouped(64, 8, 64) and not antisum.grouped(64, 8, 96) and not antisum.grouped(64, 8, 256)
    q = torch.zeros(1, 1, 8, 64)
    assert not antisum.supports(q, 64, 16)  # a CPU tensor: the torch reference
    assert not antisum.supports(q.to(torch.int32), 64, 16)


@cuda
@pytest.mark.parametrize("D", [64, 128, 256])
def test_kernel_on_the_gpu_at_a_prompts_length(D):
    S, block, stride = 4096 + 77, 64, 8  # the shipped group size (ANTISUM_STRIDE)
    q, k, _ = random_qkv(1, 6, 2, S, 0, D, dtype=torch.bfloat16, seed=D, device="cuda")
    assert antisum.supports(q, block, stride)
    got = antisum.antisum_block_mass(q, k, 0, block, stride)
    want = antisum_block_mass(q.float(), k.float(), 0, block, stride)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)  # bf16 products against float32


def test_a_kernel_that_cannot_be_built_falls_back_to_the_reference_once(monkeypatch, capsys):
    """A compilation error (or too little shared memory) for the kernel on this device, in one pass and in two:
    the estimate comes from the PyTorch reference, said once on stderr; other errors are not swallowed."""
    from triton.runtime.errors import OutOfResources

    calls = []

    def broken(*a, one_pass=None, **kw):
        calls.append(one_pass)
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(antisum, "antisum_block_mass", broken)
    monkeypatch.setattr(antisum, "_FAILED", [])
    q, k, _ = random_qkv(1, 2, 1, 200, 0, 16, seed=1)
    want = antisum_block_mass(q, k, 0, 32, 8)
    for _ in range(2):
        assert torch.equal(antisum.estimate_or_reference(q, k, 0, 32, 8), want)
    assert calls == [True, False]  # one pass, then two; neither retried
    err = capsys.readouterr().err
    assert err.count("could not be built here") == 1 and "OutOfResources" in err

    monkeypatch.setattr(antisum, "_FAILED", [])
    monkeypatch.setattr(antisum, "antisum_block_mass", lambda *a, **kw: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError, match="bad"):
        antisum.estimate_or_reference(q, k, 0, 32, 8)


def test_one_pass_that_cannot_be_built_falls_back_to_two_passes_quietly(monkeypatch, capsys):
    """The one-pass kernel (`antisum_partials`) refused by the device: the same setting in two passes, without a
    word and without trying the one pass again; sampled row groups (`row_step`) never try the one pass."""
    from triton.runtime.errors import OutOfResources

    seen = []

    def one_pass_too_big(q_, k_, start, block, stride, scale, tiles=None, row_step=1, one_pass=None):
        seen.append(one_pass)
        if one_pass:
            raise OutOfResources(300000, 232448, "shared memory")
        return torch.full((1,), 5.0)

    monkeypatch.setattr(antisum, "antisum_block_mass", one_pass_too_big)
    monkeypatch.setattr(antisum, "_FAILED", [])
    q, k, _ = random_qkv(1, 2, 1, 200, 0, 16, seed=2)
    for _ in range(2):
        assert antisum.estimate_or_reference(q, k, 0, 32, 8).item() == 5.0
    assert seen == [True, False, False] and capsys.readouterr().err == ""
    seen.clear()
    antisum.estimate_or_reference(q, k, 0, 32, 8, row_step=2)
    assert seen == [False]


def test_the_narrow_default_falls_back_to_the_base_tiles_then_to_the_reference(monkeypatch, capsys):
    """2-byte inputs at head dim <= 64 take `NARROW_TILES`; a device that cannot build them (in one pass or two)
    runs `TILES` (quietly, and never tries the narrow setting again); a device that cannot build either runs the
    reference."""
    from triton.runtime.errors import OutOfResources

    q, k, _ = random_qkv(1, 2, 1, 200, 0, 16, seed=2)
    q16, k16 = q.half(), k.half()
    assert antisum.default_tiles(64, 2) == antisum.NARROW_TILES and antisum.default_tiles(128, 2) == antisum.TILES
    assert antisum.default_tiles(64, 4) == antisum.TILES and antisum.default_tiles(256, 2) == antisum.WIDE_HEAD_TILES
    narrow = antisum.default_tiles(16, 2)  # the narrow tiles, their chunk shrunk to the head dim
    assert narrow == {**antisum.NARROW_TILES, "bk": 16} and antisum.default_tiles(8, 2)["bk"] == 0
    seen = []

    def narrow_too_big(q_, k_, start, block, stride, scale, tiles=None, row_step=1, one_pass=None):
        seen.append(tiles)
        if tiles == narrow:
            raise OutOfResources(300000, 232448, "shared memory")
        return torch.full((1,), 7.0)

    monkeypatch.setattr(antisum, "antisum_block_mass", narrow_too_big)
    monkeypatch.setattr(antisum, "_FAILED", [])
    for _ in range(2):
        assert antisum.estimate_or_reference(q16, k16, 0, 32, 8).item() == 7.0
    assert seen == [narrow, narrow, antisum.TILES, antisum.TILES]
    assert capsys.readouterr().err == ""

    def nothing_builds(*a, **kw):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(antisum, "antisum_block_mass", nothing_builds)
    monkeypatch.setattr(antisum, "_FAILED", [])
    want = antisum_block_mass(q16, k16, 0, 32, 8)
    assert torch.equal(antisum.estimate_or_reference(q16, k16, 0, 32, 8), want)
    assert antisum._FAILED == [(narrow, True), (narrow, False), (antisum.TILES, True), (antisum.TILES, False)]
    assert capsys.readouterr().err.count("could not be built here") == 1


@cuda
@pytest.mark.parametrize("D", [64, 256])
def test_one_estimate_per_kv_head_on_the_gpu_chooses_as_the_reference(D):
    """`antisum_select(per_kv_head=True)` on CUDA (the kernel over the group's mean query) keeps the blocks the
    CPU reference keeps, shared by the query heads of each kv head."""
    from dam_kernels.block_mass import antisum_select

    S, block = 2048 + 40, 64
    q, k, _ = random_qkv(1, 8, 2, S, 0, D, seed=D, amp=1.5, device="cuda")
    got = antisum_select(q, k, 0, block, 0.9, 8, tail_mass=0.9, tail_cap=8, per_kv_head=True).cpu()
    cpu = antisum_select(q.cpu(), k.cpu(), 0, block, 0.9, 8, tail_mass=0.9, tail_cap=8, per_kv_head=True)
    agree = (got == cpu).float().mean().item()
    assert agree > 0.999, agree  # float32 on both sides: only near-equal masses may order differently
    assert torch.equal(got[:, 0, :-1], got[:, 3, :-1]) and torch.equal(got[:, 4, :-1], got[:, 7, :-1])


@needs_kernels
@pytest.mark.parametrize("start, Sq, row_step", [(0, 300, 2), (0, 256, 4), (40, 250, 8), (0, 212, 4)])
def test_one_row_group_in_row_step_as_the_reference(start, Sq, row_step):
    """`row_step` in the kernel (only the sampled row groups computed; a call ending before a block's first sampled
    group takes every group, weighted as the reference weights them) gives the reference's estimate."""
    q, k, _ = random_qkv(1, 4, 2, start + Sq, start, 16, seed=row_step + Sq)
    q, k = q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE)
    got = antisum.antisum_block_mass(q, k, start, 64, 8, row_step=row_step)
    want = antisum_block_mass(q.cpu(), k.cpu(), start, 64, 8, row_step=row_step)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-4)
