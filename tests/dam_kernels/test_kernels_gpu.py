"""The DAM kernels compiled on a CUDA GPU, at the block sizes and lengths real models use.

Skipped without CUDA, or when TRITON_INTERPRET=1 (run with `TRITON_INTERPRET=0 pytest ...`).
`tests/test_kernels.py` holds the small-shape suite, which also runs compiled under
TRITON_INTERPRET=0; this file adds bf16, head dims 64 and 128, 128-row blocks, thousands of
tokens, chunked prefill and decode far beyond L, against the float32 reference.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs CUDA and TRITON_INTERPRET=0"),
]

from helpers import SHIPPED_PROFILE as SMOLLM2  # noqa: E402


def profile_for(heads: int, layer: int = 15):
    """The SmolLM2 profile's layer tiled over `heads`, or a random one of L = 512."""
    from dam_cli.artifact.profile import Profile, load_profile

    if os.path.exists(SMOLLM2):
        p = load_profile(SMOLLM2)
        layer = min(layer, p.n_layers - 1)
        idx = torch.arange(heads) % p.n_heads
        M, R, C = p.layer_true_mask(layer)[idx], p.offsets[layer][idx], p.columns[layer][idx]
    else:
        g = torch.Generator().manual_seed(layer)
        M = (torch.rand(heads, 512, 512, generator=g) < 0.05).tril()
        R = torch.rand(heads, 512, generator=g) < 0.01
        C = torch.rand(heads, 512, generator=g) < 0.01
    return Profile.from_masks(M[None], R[None], C[None])


def check(out, q, k, v, prof, start, label):
    from dam_kernels.reference import reference_attention

    mask_rows = lambda r, n: prof.mask_rows(0, r, n)  # noqa: E731
    exact = reference_attention(q.double(), k.double(), v.double(), mask_rows, start=start)
    # PyTorch's own error in the input precision: the reference with its output rounded there,
    # and the same masked softmax computed from the low-precision inputs in float32.
    low = reference_attention(q, k, v, mask_rows, start=start).double()
    torch_err = (low - exact).abs().max().item()
    err = (out.double() - exact).abs()
    assert not torch.isnan(out).any(), f"{label}: NaN"
    bound = 2 * torch_err + {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}[q.dtype]
    assert err.max().item() <= bound, (f"{label}: max {err.max().item():.3g} mean {err.mean().item():.3g} "
                                       f"> {bound:.3g} (torch {torch_err:.3g})")


def make(B, H, H_kv, S, start, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    return mk(B, H, S - start, D), mk(B, H_kv, S, D), mk(B, H_kv, S, D)


CASES = [  # (S, H, H_kv, D, dtype): below, at and above L = 512, not block multiples
    (300, 32, 8, 128, torch.bfloat16), (512, 32, 8, 64, torch.bfloat16), (1000, 9, 3, 64, torch.bfloat16),
    (2600, 32, 8, 128, torch.bfloat16), (2600, 32, 8, 64, torch.float16), (777, 32, 8, 128, torch.float16),
]


@pytest.mark.parametrize("S,H,H_kv,D,dtype", CASES)
def test_prefill(S, H, H_kv, D, dtype):
    from dam_cli.runtime.attention import sparse_attention

    prof = profile_for(H)
    q, k, v = make(2 if S < 1000 else 1, H, H_kv, S, 0, D, dtype, S)
    out = sparse_attention(q, k, v, prof, 0, backend="triton")
    check(out, q, k, v, prof, 0, f"S={S} {H}/{H_kv} D={D} {dtype}")


@pytest.mark.parametrize("start", [200, 700, 2000])
def test_chunked_prefill(start):
    from dam_cli.runtime.attention import sparse_attention

    prof = profile_for(32)
    q, k, v = make(1, 32, 8, start + 300, start, 128, torch.bfloat16, start)
    check(sparse_attention(q, k, v, prof, 0, start=start, backend="triton"), q, k, v, prof, start,
          f"chunk start={start}")


@pytest.mark.parametrize("t,Sq", [(0, 1), (300, 4), (511, 1), (512, 1), (5000, 1), (5000, 16), (40000, 1),
                                  (40000, 4)])
def test_decode(t, Sq):
    from dam_cli.runtime.attention import sparse_attention

    if t + 1 < Sq:
        pytest.skip("fewer positions than rows")
    prof = profile_for(32)
    start = t + 1 - Sq
    q, k, v = make(2, 32, 8, t + 1, start, 128, torch.bfloat16, t)
    check(sparse_attention(q, k, v, prof, 0, start=start, backend="triton"), q, k, v, prof, start,
          f"decode t={t} Sq={Sq}")


def test_all_causal_long_equals_sdpa():
    """An all-allowed profile with L = S: the kernel is causal attention (cuDNN/flash as peer)."""
    from dam_cli.artifact.profile import Profile
    from dam_cli.runtime.attention import sparse_attention

    S, H = 1536, 8
    ones = torch.ones(1, H, S, dtype=torch.bool)
    prof = Profile.from_masks(torch.ones(1, H, S, S, dtype=torch.bool).tril(), ones, ones)
    q, k, v = make(1, H, 2, S, 0, 128, torch.bfloat16, 1)
    out = sparse_attention(q, k, v, prof, 0, backend="triton")
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(4, 1), v.double().repeat_interleave(4, 1), is_causal=True)
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    bound = 2 * (low.double() - exact).abs().max().item() + 8e-3
    err = (out.double() - exact).abs()
    assert err.max().item() <= bound, f"max {err.max().item():.3g} mean {err.mean().item():.3g} > {bound:.3g}"


@pytest.mark.parametrize("use_tma", [False, True])
def test_prefill_load_paths_agree(use_tma):
    """Pointer loads and TMA descriptor loads compute the same thing (chunk beyond L, ragged end)."""
    from dam_kernels.layout import device_masks, layout_for
    from dam_kernels.prefill import dam_prefill

    prof = profile_for(32, layer=1)
    start, S = 600, 1901
    q, k, v = make(1, 32, 8, S, start, 128, torch.bfloat16, 5)
    out = dam_prefill(q, k, v, device_masks(prof, 0, q.device), layout_for(prof, 0, S, 128, 64, q.device),
                      start=start, scale=128**-0.5, use_tma=use_tma)
    check(out, q, k, v, prof, start, f"use_tma={use_tma}")
