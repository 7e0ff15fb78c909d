"""Head dims 96 (Phi-3: padded to 128 in the kernels) and 256 (Gemma) in the Triton prefill and decode
kernels, against the float64 oracle and the reference (tests/helpers.py: check_against_oracle).

On the CPU the kernels run in the Triton interpreter at small shapes; the GPU tests (CUDA and
TRITON_INTERPRET=0) run realistic lengths with bf16, a window and soft-capping against the reference.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from dam_kernels.decode import dam_decode  # noqa: E402
from dam_kernels.layout import device_masks, layout_for  # noqa: E402
from dam_kernels.prefill import dam_prefill, prefill_blocks  # noqa: E402
from dam_kernels.reference import reference_attention  # noqa: E402
from helpers import (  # noqa: E402
    KERNEL_DTYPES,
    check_against_oracle,
    gpu_only,
    half_dense_profile,
    mask_rows_fn,
    needs_kernels,
    on_device,
    random_profile,
    random_qkv,
)


@needs_kernels
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("D", [96, 256])
def test_prefill_head_dim(D, dtype):
    prof = half_dense_profile(seed=D)
    S = 37  # not a multiple of the blocks, beyond L = 32
    q, k, v = on_device(*random_qkv(2, 4, 2, S, 0, D, dtype=dtype, seed=D))
    out = dam_prefill(q, k, v, device_masks(prof, 0, q.device), layout_for(prof, 0, S, 16, 16, q.device),
                      start=0, scale=D**-0.5)
    check_against_oracle(out, q, k, v, prof, 0, label=f"D={D} {dtype}")


@needs_kernels
@pytest.mark.parametrize("D", [96, 256])
def test_prefill_head_dim_window_softcap_chunk(D):
    prof = random_profile(p_m=0.4, p_r=0.3, p_c=0.2, seed=D, L=16)
    S, start, window = 45, 19, 12
    q, k, v = on_device(*random_qkv(1, 4, 1, S, start, D, dtype=torch.float32, seed=D, amp=1.5))
    lay = layout_for(prof, 0, S, 16, 32, q.device, window=window)
    out = dam_prefill(q, k, v, device_masks(prof, 0, q.device), lay, start=start, scale=D**-0.5,
                      window=window, softcap=4.0)
    check_against_oracle(out, q, k, v, prof, start, window, 4.0, label=f"D={D} windowed chunk")


@needs_kernels
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("D,t,Sq", [(96, 40, 1), (256, 40, 1), (96, 21, 3), (256, 70, 2)])
def test_decode_head_dim(D, t, Sq, dtype):
    prof = random_profile(p_m=0.4, p_r=0.3, p_c=0.2, seed=t)
    q, k, v = on_device(*random_qkv(2, 4, 2, t + Sq, t, D, dtype=dtype, seed=t))
    masks = device_masks(prof, 0, q.device)
    out = dam_decode(q, k, v, masks, start=t, scale=D**-0.5, block_n=16)
    check_against_oracle(out, q, k, v, prof, t, label=f"decode D={D} t={t} {dtype}")
    out = dam_decode(q, k, v, masks, start=t, scale=D**-0.5, block_n=16, window=9, softcap=2.0)
    check_against_oracle(out, q, k, v, prof, t, 9, 2.0, label=f"decode D={D} t={t} W=9 cap=2 {dtype}")


# ---- GPU: realistic sizes ------------------------------------------------------------------
def _gpu_check(out, q, k, v, prof, start, window, softcap, label):
    """Against the float32 reference: at most twice its own error from rounding to q's dtype."""
    rows = mask_rows_fn(prof)
    kw = dict(start=start, window=window, softcap=softcap, key_span=prof.pcl)
    exact = reference_attention(q.float(), k.float(), v.float(), rows, **kw).double()
    torch_err = (reference_attention(q, k, v, rows, **kw).double() - exact).abs().max().item()
    err = (out.double() - exact).abs().max().item()
    bound = 2 * torch_err + {torch.bfloat16: 8e-3, torch.float16: 1e-3}[q.dtype]
    assert not torch.isnan(out).any() and err <= bound, f"{label}: {err:.3g} > {bound:.3g}"


def _gpu_profile(heads: int, L: int = 512):
    from dam_cli.artifact.profile import Profile

    g = torch.Generator().manual_seed(heads)
    M = (torch.rand(heads, L, L, generator=g) < 0.05).tril()
    R, C = torch.rand(heads, L, generator=g) < 0.02, torch.rand(heads, L, generator=g) < 0.01
    R[:, :64] = True  # a local band and a sink, as in real profiles
    C[:, :4] = True
    return Profile.from_masks(M[None], R[None], C[None])


@gpu_only
@pytest.mark.parametrize("D,H,H_kv,window,softcap", [(256, 4, 1, 512, None), (256, 8, 4, None, 50.0),
                                                     (96, 32, 32, None, None), (96, 32, 8, 4096, 30.0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_head_dims(D, H, H_kv, window, softcap, dtype):
    prof = _gpu_profile(H)
    S, start = 3000, 1100
    g = torch.Generator(device="cuda").manual_seed(D)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    q, k, v = mk(1, H, S - start, D), mk(1, H_kv, S, D), mk(1, H_kv, S, D)
    BM, BN = prefill_blocks(D)
    lay = layout_for(prof, 0, S, BM, BN, "cuda", window=window)
    masks = device_masks(prof, 0, "cuda")
    out = dam_prefill(q, k, v, masks, lay, start=start, scale=D**-0.5, window=window, softcap=softcap)
    _gpu_check(out, q, k, v, prof, start, window, softcap, f"prefill D={D} W={window} cap={softcap} {dtype}")
    for t in (700, S - 1):  # decode within the window of L and far beyond it
        q1 = q[:, :, t - start : t - start + 1] if t >= start else mk(1, H, 1, D)
        out = dam_decode(q1, k[:, :, : t + 1], v[:, :, : t + 1], masks, start=t, scale=D**-0.5,
                         window=window, softcap=softcap)
        _gpu_check(out, q1, k[:, :, : t + 1], v[:, :, : t + 1], prof, t, window, softcap, f"decode t={t} D={D}")


@needs_kernels
@pytest.mark.parametrize("D,Sq", [(64, 1), (256, 1), (256, 3)])
def test_decode_combines_many_splits(monkeypatch, D, Sq):
    """Every key block selected by the dynamic part and one block per split (about 130 splits): the combine reads
    its partials in several wide chunks (64 splits at a time at D = 64, 16 at D = 256), and the rows equal
    dense causal attention."""
    from dam_kernels import decode

    launches = []
    real = decode._dam_decode_combine_kernel
    monkeypatch.setattr(decode, "programs_wanted", lambda device: 1 << 20)

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **kw: (launches.append(a[6]), real[grid](*a, **kw))

    monkeypatch.setattr(decode, "_dam_decode_combine_kernel", Spy())
    prof = random_profile(p_m=0.4, p_r=0.3, p_c=0.2, seed=D + Sq)
    t, B, H = 2100, 1, 4
    q, k, v = on_device(*random_qkv(B, H, 1, t + Sq, t, D, dtype=torch.float32, seed=D))
    n_kd = -(-(t + Sq) // 16)
    dyn = torch.ones(B, H, n_kd, dtype=torch.bool, device=q.device)
    out = dam_decode(q, k, v, device_masks(prof, 0, q.device), start=t, scale=D**-0.5, block_n=16, dyn=dyn,
                     dyn_block=16, max_extra=n_kd)
    assert launches and launches[0] > 2 * max(16, min(64, 4096 // D))  # n_splits: several chunks of splits
    causal = torch.arange(t + Sq, device=q.device)[None, :] <= torch.arange(t, t + Sq, device=q.device)[:, None]
    s_ = (q.double() @ k.double().transpose(-1, -2)) * D**-0.5
    want = torch.softmax(s_.masked_fill(~causal, float("-inf")), -1) @ v.double()
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
