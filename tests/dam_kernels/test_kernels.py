"""Triton DAM kernels against the float32 reference and a float64 dense masked softmax.

On the CPU they run in the Triton interpreter (TRITON_INTERPRET=1, set before triton loads);
with TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled on the GPU (bf16 added).
Tolerance in the FlashAttention style: the kernel's error against float64 may be at most twice
PyTorch's own error in the same low precision, plus a small absolute term.
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
    all_allowed_profile,
    dense_masked_softmax,
    guard_only_profile,
    random_profile,
    random_qkv,
    require_kernel_device,
)
from helpers import SHIPPED_PROFILE as SMOLLM2  # noqa: E402

from dam_cli.artifact.profile import load_profile  # noqa: E402
from dam_cli.errors import DamError  # noqa: E402
from dam_cli.runtime.attention import sparse_attention  # noqa: E402

DEVICE = require_kernel_device()


# ---- the check -----------------------------------------------------------------------------
def check(out, q, k, v, profile, layer, start, label=""):
    """Kernel vs float64 dense (from profile.mask), vs the reference, with FA-style tolerance."""
    S = k.shape[2]
    allowed = profile.mask(layer, S)[:, start:S, :S]
    exact = dense_masked_softmax(q, k, v, allowed, dtype=torch.float64, device="cpu")
    low = dense_masked_softmax(q, k, v, allowed, dtype=q.dtype if q.dtype != torch.bfloat16 else torch.float32,
                               device="cpu")
    if q.dtype == torch.bfloat16:  # CPU bf16 matmul is unreliable: emulate by rounding operands
        low = dense_masked_softmax(q.float(), k.float(), v.float(), allowed, dtype=torch.float32,
                                   device="cpu").to(torch.bfloat16)
    torch_err = (low.double() - exact).abs().max().item()
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[q.dtype]
    got = out.detach().cpu().double()
    assert not torch.isnan(got).any(), f"{label}: NaN in output"
    err = (got - exact).abs()
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), lambda r, n: profile.mask_rows(layer, r, n),
                              start=start).double()
    ref_err = (got - ref).abs()
    bound = 2 * torch_err + atol
    assert err.max().item() <= bound, (f"{label}: vs float64 max {err.max().item():.3g} mean "
                                       f"{err.mean().item():.3g} > bound {bound:.3g} (torch {torch_err:.3g})")
    assert ref_err.max().item() <= bound, (f"{label}: vs reference max {ref_err.max().item():.3g} mean "
                                           f"{ref_err.mean().item():.3g} > bound {bound:.3g}")


def run_triton(q, k, v, profile, layer=0, start=0):
    return sparse_attention(q, k, v, profile, layer, start=start, backend="triton")


# ---- prefill -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("S", [7, 16, 37])  # below, at and above L = 16; not block multiples
def test_prefill_random_gqa_batch2(S, dtype):
    prof = random_profile(heads=6, seed=S)
    q, k, v = random_qkv(2, 6, 2, S, 0, 16, dtype=dtype, seed=S, device=DEVICE)
    check(run_triton(q, k, v, prof), q, k, v, prof, 0, 0, f"S={S} {dtype}")


@pytest.mark.parametrize("start", [9, 20])  # a chunk crossing L, and one wholly beyond it
def test_prefill_chunk_mid_sequence(start):
    prof = random_profile(heads=6, seed=11, p_r=0.3)
    q, k, v = random_qkv(1, 6, 2, 53, start, 16, dtype=torch.float16, seed=start, device=DEVICE)
    check(run_triton(q, k, v, prof, start=start), q, k, v, prof, 0, start, f"start={start}")


def test_prefill_head_dim_64_dense_rows():
    prof = random_profile(heads=4, L=32, p_m=0.6, p_r=0.4, p_c=0.2, seed=3)
    q, k, v = random_qkv(1, 4, 4, 45, 0, 64, dtype=torch.float16, seed=3, device=DEVICE)
    check(run_triton(q, k, v, prof), q, k, v, prof, 0, 0, "D=64")


def test_all_allowed_equals_causal_sdpa():
    # Beyond L only offsets < L and columns < L exist, so "all causal pairs" holds up to S = 2L.
    prof = all_allowed_profile(heads=6, L=32)
    q, k, v = random_qkv(2, 6, 2, 41, 0, 16, dtype=torch.float16, seed=1, device=DEVICE)
    out = run_triton(q, k, v, prof)
    qf, kf, vf = (t.cpu().double() for t in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        qf, kf.repeat_interleave(3, 1), vf.repeat_interleave(3, 1), is_causal=True)
    low = torch.nn.functional.scaled_dot_product_attention(
        q.cpu().float(), k.cpu().float().repeat_interleave(3, 1), v.cpu().float().repeat_interleave(3, 1),
        is_causal=True).half()
    bound = 2 * (low.double() - sdpa).abs().max().item() + 1e-3
    err = (out.cpu().double() - sdpa).abs()
    assert err.max().item() <= bound, f"max {err.max().item():.3g} mean {err.mean().item():.3g} > {bound:.3g}"
    check(out, q, k, v, prof, 0, 0, "all")


def test_diagonal_only_returns_own_value():
    prof = guard_only_profile(heads=6)
    q, k, v = random_qkv(2, 6, 2, 37, 0, 16, dtype=torch.float16, seed=2, device=DEVICE)
    out = run_triton(q, k, v, prof)
    want = v.repeat_interleave(3, 1)
    assert torch.equal(out.cpu(), want.cpu())
    check(run_triton(q[:, :, 30:], k, v, prof, start=30), q[:, :, 30:], k, v, prof, 0, 30, "diag decode")


def test_block_size_changes_only_rounding():
    prof = random_profile(heads=6, seed=21, p_r=0.3, p_c=0.3)
    q, k, v = random_qkv(2, 6, 2, 45, 0, 16, dtype=torch.float32, seed=21, device=DEVICE)
    masks = device_masks(prof, 0, q.device)
    outs = []
    for bm, bn in ((16, 16), (32, 16), (16, 32), (64, 32)):
        out = dam_prefill(q, k, v, masks, layout_for(prof, 0, 45, bm, bn, q.device), start=0, scale=0.25)
        check(out, q, k, v, prof, 0, 0, f"blocks {bm}x{bn}")
        outs.append(out.cpu())
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() < 1e-5


# ---- decode --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("t", [0, 5, 15, 16, 40, 77])  # below, at and beyond L, beyond 2L
def test_decode_positions(t, dtype):
    prof = random_profile(heads=6, seed=100 + t)
    q, k, v = random_qkv(2, 6, 2, t + 1, t, 16, dtype=dtype, seed=t, device=DEVICE)
    check(run_triton(q, k, v, prof, start=t), q, k, v, prof, 0, t, f"decode t={t} {dtype}")


@pytest.mark.parametrize("Sq,block_n", [(4, 16), (16, 32), (3, 64)])
def test_decode_several_rows(Sq, block_n):
    prof = random_profile(heads=6, seed=7, p_r=0.3)
    S = 70
    q, k, v = random_qkv(2, 6, 2, S, S - Sq, 16, dtype=torch.float16, seed=Sq, device=DEVICE)
    out = dam_decode(q, k, v, device_masks(prof, 0, q.device), start=S - Sq, scale=0.25, block_n=block_n)
    check(out, q, k, v, prof, 0, S - Sq, f"decode Sq={Sq} bn={block_n}")


# ---- real profile --------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists(SMOLLM2), reason="real SmolLM2 profile not built yet")
def test_real_profile():
    prof = load_profile(SMOLLM2)
    H, H_kv, D, L = prof.n_heads, prof.meta.n_kv_heads, prof.meta.head_dim, prof.pcl
    layer = prof.n_layers // 2
    if D not in (16, 32, 64, 128):
        pytest.skip(f"head dim {D} is not a kernel head dim")
    # A chunk crossing L and decode steps at and beyond L keep the interpreter's work small.
    S, start = L + 40, L - 24
    q, k, v = random_qkv(1, H, H_kv, S, start, D, dtype=torch.float16, seed=9, device=DEVICE)
    check(run_triton(q, k, v, prof, layer, start), q, k, v, prof, layer, start, "real chunk")
    for t in (L - 1, L + 300):
        q, k, v = random_qkv(1, H, H_kv, t + 1, t, D, dtype=torch.float16, seed=t, device=DEVICE)
        check(run_triton(q, k, v, prof, layer, t), q, k, v, prof, layer, t, f"real decode t={t}")


# ---- bad input -----------------------------------------------------------------------------
def test_bad_inputs_raise_one_line_errors(monkeypatch):
    prof = random_profile(heads=6)
    q, k, v = random_qkv(1, 6, 2, 20, 0, 16, dtype=torch.float16, device=DEVICE)
    cases = [
        (lambda: sparse_attention(q, k[:, :, :-1], v[:, :, :-1], prof, 0, backend="triton"), "positions"),
        (lambda: sparse_attention(q, k, v.float(), prof, 0, backend="triton"), "same shape|dtypes"),
        (lambda: sparse_attention(q, k, v, prof, 3, backend="triton"), "out of range"),
        (lambda: sparse_attention(q[:, :4], k, v, prof, 0, backend="triton"), "heads"),
        (lambda: sparse_attention(q.double(), k.double(), v.double(), prof, 0, backend="triton"), "float16"),
        (lambda: sparse_attention(*random_qkv(1, 6, 2, 20, 0, 24, dtype=torch.float16, device=DEVICE), prof, 0,
                                  backend="triton"), "head dims"),
        (lambda: sparse_attention(q, k, v, prof, 0, backend="cuda"), "unknown backend"),
        (lambda: sparse_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], prof, 0, backend="triton"), "no query rows"),
        # what the arguments are (these once ran quietly as integers, or failed deep inside with another error)
        (lambda: sparse_attention(q.int(), k.int(), v.int(), prof, 0, backend="reference"), "q must be floating"),
        (lambda: sparse_attention(q.bool(), k.bool(), v.bool(), prof, 0), "q must be floating point"),
        (lambda: sparse_attention(q.tolist(), k, v, prof, 0), "q must be a torch.Tensor"),
        (lambda: sparse_attention(q[..., :0], k[..., :0], v[..., :0], prof, 0), "head dim 0"),
        (lambda: sparse_attention(q, k, v, "p.safetensors", 0), "profile must be a loaded Profile"),
        (lambda: sparse_attention(q, k, v, prof, True), "layer must be an int, got True"),
        (lambda: sparse_attention(q, k, v, prof, 1.0), "layer must be an int, got 1.0"),
        (lambda: sparse_attention(q, k, v, prof, 0, start="0"), "start must be an int"),
    ]
    import re

    for fn, pattern in cases:
        with pytest.raises(DamError) as e:
            fn()
        assert re.search(pattern, str(e.value)), str(e.value)
        assert "\n" not in str(e.value)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(DamError, match="needs CUDA"):
            sparse_attention(q, k, v, prof, 0, backend="triton")


@pytest.mark.parametrize("S, start", [(300, 0), (400, 150)])
def test_prefill_128_key_tiles(S, start):
    # A 128-key tile reads two 64-bit mask words per row (kernels/prefill.py: dam_tile_mask);
    # L = 128 so rows below L span two words too.
    prof = random_profile(heads=4, L=128, seed=S)
    q, k, v = random_qkv(1, 4, 2, S, start, 16, dtype=torch.float16, seed=S, device=DEVICE)
    masks = device_masks(prof, 0, q.device)
    for bm in (16, 64):
        lay = layout_for(prof, 0, S, bm, 128, q.device)
        out = dam_prefill(q, k, v, masks, lay, start=start, scale=16**-0.5)
        check(out, q, k, v, prof, 0, start, f"S={S} start={start} {bm}x128")


@pytest.mark.parametrize("qb_major_max", [0, 10**6])
def test_both_grid_orders(qb_major_max, monkeypatch):
    # The grid runs query-block-major for short sequences and head-major for long ones
    # (kernels/prefill.py: QB_MAJOR_MAX_BLOCKS); both orders must compute the same thing.
    import dam_kernels.prefill as prefill_mod

    monkeypatch.setattr(prefill_mod, "QB_MAJOR_MAX_BLOCKS", qb_major_max)
    prof = random_profile(heads=6, seed=21, p_r=0.3)
    q, k, v = random_qkv(2, 6, 2, 70, 12, 16, dtype=torch.float16, seed=21, device=DEVICE)
    check(run_triton(q, k, v, prof, start=12), q, k, v, prof, 0, 12, f"qb_major_max={qb_major_max}")
