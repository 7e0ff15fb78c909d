"""`sparse_attention`: the one public entry point to DAM attention (docs/api.md).

Dispatches to the Triton kernels (`dam_kernels`) on CUDA and to the PyTorch reference
elsewhere; checks every shape before any launch. Up to `DECODE_MAX_ROWS` query rows go to the
split-K decode kernel (no layout needed), longer chunks to the block-sparse prefill kernel.
"""

from __future__ import annotations

import os

import torch

from .errors import DamError

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (16, 32, 64, 128)
DECODE_MAX_ROWS = 16  # query rows up to which the split-K decode kernel beats the prefill one


def _check(q, k, v, profile, layer: int, start: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise DamError(f"q, k and v must be 4-D [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Sq, D = q.shape
    if k.shape != v.shape:
        raise DamError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise DamError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head dim")
    if H % k.shape[1]:
        raise DamError(f"q has {H} heads, not a multiple of the {k.shape[1]} kv heads")
    if k.shape[2] != start + Sq:
        raise DamError(f"keys must cover positions 0..start+Sq-1: Sk={k.shape[2]}, start={start}, Sq={Sq}")
    if start < 0:
        raise DamError(f"start must be >= 0, got {start}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise DamError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if H != profile.n_heads:
        raise DamError(f"q has {H} heads but the profile has {profile.n_heads} per layer: use a profile made for this model")
    if not 0 <= layer < profile.n_layers:
        raise DamError(f"layer {layer} is out of range: the profile has layers 0..{profile.n_layers - 1}")
    if Sq < 1:
        raise DamError("q holds no query rows (Sq = 0): pass at least one position")
    if not (q.device == k.device == v.device):
        raise DamError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    max_pos = profile.meta.model.get("max_position") if isinstance(profile.meta.model, dict) else None
    if isinstance(max_pos, int) and max_pos > 0 and k.shape[2] > max_pos:
        raise DamError(f"{k.shape[2]} positions exceed the model's maximum of {max_pos} (profile "
                       "metadata max_position): shorten the input")


def _check_triton(q, k, v) -> None:
    """What the Triton kernels need beyond the shape rules: checked before any launch."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise DamError(f"backend 'triton' needs CUDA tensors, got {q.device}: use backend='reference' "
                       "(or 'auto') on this device")
    if q.dtype not in TRITON_DTYPES:
        raise DamError(f"backend 'triton' takes float16, bfloat16 or float32, got {q.dtype}: cast q, k, v")
    D = q.shape[-1]
    if D not in TRITON_HEAD_DIMS:
        raise DamError(f"backend 'triton' supports head dims {TRITON_HEAD_DIMS}, got {D}: use backend='reference'")
    # The kernels index within one (batch, head) slice in int32.
    for name, t in (("q", q), ("k", k), ("v", v)):
        span = (t.shape[2] - 1) * abs(t.stride(2)) + (D - 1) * abs(t.stride(3))
        if span >= 2**31:
            raise DamError(f"{name} spans {span} elements within one head, beyond the kernels' int32 "
                           "indexing: make it contiguous as [B, H, S, D] or shorten the input")


def _blocks(D: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the prefill kernel: big tiles on GPUs, small ones in the interpreter."""
    if device.type != "cuda":
        return 16, 16
    return (128, 64) if D >= 128 else (128, 64)


def _triton_attention(q, k, v, profile, layer: int, start: int, scale: float | None) -> torch.Tensor:
    from dam_kernels.decode import dam_decode
    from dam_kernels.layout import device_masks, layout_for
    from dam_kernels.prefill import dam_prefill

    B, H, Sq, D = q.shape
    G = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    masks = device_masks(profile, layer, q.device)
    if Sq <= DECODE_MAX_ROWS and G * Sq <= 128:
        return dam_decode(q, k, v, masks, start=start, scale=scale,
                          block_n=16 if q.device.type != "cuda" else 64)
    BM, BN = _blocks(D, q.device)
    lay = layout_for(profile, layer, k.shape[2], BM, BN, q.device)
    return dam_prefill(q, k, v, masks, lay, start=start, scale=scale)


def sparse_attention(q, k, v, profile, layer: int, *, start: int = 0, backend: str = "auto",
                     scale: float | None = None) -> torch.Tensor:
    """DAM attention of query rows `start .. start+Sq-1` over keys `0 .. Sk-1` of one layer.

    q `[B, H, Sq, D]`, k and v `[B, H_kv, Sk, D]` with `Sk = start + Sq`. Returns `[B, H, Sq, D]`.
    backend: "triton", "reference" or "auto" (Triton on CUDA for fp16/bf16/fp32 and head dims
    16..128, the reference elsewhere). Raises `DamError` on any bad input before a launch.
    """
    if backend not in BACKENDS:
        raise DamError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    _check(q, k, v, profile, layer, start)
    if backend == "auto":
        # Head dims or dtypes the kernels do not cover fall back to the exact reference.
        fits = q.dtype in TRITON_DTYPES and q.shape[-1] in TRITON_HEAD_DIMS
        backend = "triton" if q.is_cuda and fits else "reference"
    if backend == "reference":
        from dam_kernels.reference import reference_attention

        return reference_attention(q, k, v, lambda rows, n: profile.mask_rows(layer, rows, n),
                                   start=start, scale=scale)
    _check_triton(q, k, v)
    return _triton_attention(q, k, v, profile, layer, start, scale)
