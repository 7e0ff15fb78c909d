"""`sparse_attention`: the one public entry point to DAM attention (docs/reference/api.md).

Dispatches to the Triton kernels (`dam_kernels`) on CUDA and to the PyTorch reference
elsewhere; checks every shape before any launch. Up to `DECODE_MAX_ROWS` query rows go to the
split-K decode kernel (no layout needed), longer chunks to the block-sparse prefill kernel.
"""

from __future__ import annotations

import os

import torch
from dam_kernels.selection import SCORES as TOPK_SCORES  # noqa: F401  (still read by dam_cli.evaluation)
from dam_kernels.selection import DynamicSelection

from dam_cli.errors import DamError

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (16, 32, 64, 128)
DECODE_MAX_ROWS = 16  # query rows up to which the split-K decode kernel beats the prefill one
DECODE_BLOCK_N = 64  # the decode kernel's key block on CUDA: dynamic blocks under a CUDA graph are multiples of it
FUSED_SELECTION = True  # graph-loop decode steps select in two launches (dam_kernels.select); False: the torch chain


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
        raise DamError(f"q has {H} heads but the profile has {profile.n_heads} per layer: use a profile made for "
                       "this model")
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
    return 128, 64  # best of the H200 sweep at head dims 64 and 128 (docs/results/kernel-speed.md)


def _triton_attention(q, k, v, profile, layer: int, start: int, scale: float | None,
                      dyn: DynamicSelection | None = None, valid_len: torch.Tensor | None = None,
                      block_sums: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path; `dyn` is the dynamic part when on (None: off)."""
    from dam_kernels.decode import dam_decode
    from dam_kernels.layout import device_masks, layout_for
    from dam_kernels.prefill import dam_prefill

    B, H, Sq, D = q.shape
    G = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    masks = device_masks(profile, layer, q.device)
    dec_bn = 16 if q.device.type != "cuda" else DECODE_BLOCK_N
    blk = dyn.block if dyn is not None else 0
    if (dyn is not None and Sq <= DECODE_MAX_ROWS and G * Sq <= 128 and start // blk == (start + Sq - 1) // blk
            and blk % dec_bn == 0 and (valid_len is None or Sq == 1)):
        # A decode step with the dynamic part: the selection of the rows' one query block goes to
        # the split-K decode kernel as extra candidate blocks (no layout is built). With
        # `valid_len` both run on the device position (graph-safe). A decode step's rows are the
        # last of the call: they get the tail budget.
        from dam_kernels.dynamic import select_blocks_one

        max_extra = max(1, dyn.last_topk) * G * (blk // dec_bn)
        if FUSED_SELECTION and block_sums is not None and valid_len is not None and Sq == 1:
            # Under the graph loop: the selection in two launches (dam_kernels.select).
            from dam_kernels.select import select_extra

            ext = select_extra(q, block_sums, dyn, block_n=dec_bn, pcl=masks.pcl, n_keys=k.shape[2],
                               valid_len=valid_len, max_extra=max_extra)
            return dam_decode(q, k, v, masks, start=start, scale=scale, block_n=dec_bn, dyn_block=blk,
                              valid_len=valid_len, extra=ext)
        chosen = select_blocks_one(q, k, start, dyn.last_topk, blk, valid_len=valid_len, sums=block_sums,
                                   score=dyn.score)
        return dam_decode(q, k, v, masks, start=start, scale=scale, block_n=dec_bn, dyn=chosen,
                          dyn_block=blk, max_extra=max_extra, valid_len=valid_len)
    if dyn is not None:
        # The dynamic part: the kernel's query blocks are the selection's blocks; the selected
        # key blocks join the layout as full blocks, one batch row at a time.
        from dam_kernels.dynamic import merge_layout, select_blocks

        BN = 64 if q.device.type == "cuda" and blk % 64 == 0 else 16
        lay = layout_for(profile, layer, k.shape[2], blk, BN, q.device)
        chosen = select_blocks(q, k, start, dyn.topk, blk, tail_topk=dyn.tail_topk, score=dyn.score)
        out = torch.empty_like(q)
        for b in range(B):
            lay_b = merge_layout(lay, chosen[b], blk)
            out[b : b + 1] = dam_prefill(q[b : b + 1], k[b : b + 1], v[b : b + 1], masks, lay_b,
                                         start=start, scale=scale)
        return out
    if Sq <= DECODE_MAX_ROWS and G * Sq <= 128:
        return dam_decode(q, k, v, masks, start=start, scale=scale, block_n=dec_bn, valid_len=valid_len)
    BM, BN = _blocks(D, q.device)
    lay = layout_for(profile, layer, k.shape[2], BM, BN, q.device)
    return dam_prefill(q, k, v, masks, lay, start=start, scale=scale)


def rows_causal_mask(first, Sq: int, Sk: int, device) -> torch.Tensor:
    """bool `[Sq, Sk]`: row `r` (position `first + r`) may see keys `0 .. first + r`.

    `first` is an int, or a 0-d tensor on `device` (a static cache's fill level minus `Sq`, kept
    on the device so that a CUDA graph can capture the call).
    """
    last = first + torch.arange(Sq, device=device)
    return torch.arange(Sk, device=device)[None, :] <= last[:, None]


_HEAD_INDEX: dict = {}


def _head_index(heads: list[int], device: torch.device) -> torch.Tensor:
    """The retrieval heads as an index tensor on `device`, made once (a CUDA graph capture may
    not copy from the host)."""
    key = (tuple(heads), str(device))
    if key not in _HEAD_INDEX:
        _HEAD_INDEX[key] = torch.tensor(heads, device=device)
    return _HEAD_INDEX[key]


def _full_heads_overlay(out, q, k, v, heads: list[int], start: int, scale: float | None,
                        valid_len: torch.Tensor | None = None) -> None:
    """Recompute the retrieval heads (the full-heads option) with dense causal SDPA, in place.

    Only the kv heads those query heads read are gathered; the others are never copied. With
    `valid_len` (a static cache), the causal limit of each row is computed on the device.
    """
    B, H, Sq, D = q.shape
    G = H // k.shape[1]
    idx = _head_index(heads, q.device)
    qs, ks, vs = q[:, idx], k[:, idx // G], v[:, idx // G]
    Sk = k.shape[2]
    if valid_len is None and start == 0:
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
    else:  # rows see keys up to their own position
        first = valid_len.reshape(()) - Sq if valid_len is not None else start
        allowed = rows_causal_mask(first, Sq, Sk, q.device)
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
    out[:, idx] = o.to(out.dtype)


def _with_full_heads(out, q, k, v, profile, layer: int, start: int, scale: float | None,
                     valid_len: torch.Tensor | None = None) -> torch.Tensor:
    """`out` with the profile's retrieval heads of `layer` (if any) recomputed on full attention."""
    full_heads = getattr(profile, "full_heads", None)
    if full_heads is not None and bool(full_heads[layer].any()):
        _full_heads_overlay(out, q, k, v, full_heads[layer].nonzero().flatten().tolist(), start, scale,
                            valid_len=valid_len)
    return out


def active_dynamic(dynamic: DynamicSelection | None) -> DynamicSelection | None:
    """`dynamic` checked (`DamError` naming the field), or None when the part is off (None or `topk` 0)."""
    if dynamic is None:
        return None
    if not isinstance(dynamic, DynamicSelection):
        raise DamError(f"dynamic must be a DynamicSelection (from dam_cli import DynamicSelection), got "
                       f"{type(dynamic).__name__}")
    dynamic.validate(error=DamError)
    return dynamic if dynamic.on else None


def sparse_attention(q, k, v, profile, layer: int, *, start: int = 0, backend: str = "auto",
                     scale: float | None = None, dynamic: DynamicSelection | None = None,
                     valid_len: torch.Tensor | None = None, block_sums: torch.Tensor | None = None) -> torch.Tensor:
    """DAM attention of query rows `start .. start+Sq-1` over keys `0 .. Sk-1` of one layer.

    q `[B, H, Sq, D]`, k and v `[B, H_kv, Sk, D]` with `Sk = start + Sq`. Returns `[B, H, Sq, D]`.
    backend: "triton", "reference" or "auto" (Triton on CUDA for fp16/bf16/fp32 and head dims
    16..128, the reference elsewhere). Raises `DamError` on any bad input before a launch.
    `dynamic` (a `DynamicSelection` with `topk` > 0; None: off) adds the dynamic part (beyond the
    paper; `dam_kernels.dynamic`): per query block of `dynamic.block` rows, the `dynamic.topk`
    earlier key blocks with the best `dynamic.score`, and `dynamic.tail_topk` of them in the
    call's last query block (where a prompt's question sits, and every decode step).
    Heads the profile keeps on full attention (the retrieval-heads option) see every causal key.

    `valid_len` (a one-element integer tensor on q's device) makes k and v a static cache, as
    transformers' `StaticCache` holds them: only the first `valid_len` slots are filled, the query
    rows are the last `Sq` of those, and `start` is ignored. On the Triton backend a decode call
    (up to 16 rows) then reads the position on the device only, so it can be captured in a CUDA
    graph (`dam_cli.runtime.decode`); other calls read `valid_len` once on the host and slice.
    `block_sums` (with `valid_len` and the dynamic part, one decode row): the key-block summaries
    of this layer's static cache, kept by `dam_kernels.dynamic.update_block_summary` with the same
    score, so the selection does not read every key; ignored elsewhere.
    """
    if backend not in BACKENDS:
        raise DamError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    dyn = active_dynamic(dynamic)
    if valid_len is not None:
        if not isinstance(valid_len, torch.Tensor) or valid_len.numel() != 1 or valid_len.is_floating_point():
            raise DamError("valid_len must be a one-element integer tensor (the filled slots of a static cache)")
        if valid_len.device != q.device:
            raise DamError(f"valid_len is on {valid_len.device} but q on {q.device}: keep it on q's device")
        Sq = q.shape[2] if q.dim() == 4 else 0
        graph_safe = (backend != "reference" and q.is_cuda and Sq <= DECODE_MAX_ROWS
                      and (dyn is None or (Sq == 1 and dyn.block % DECODE_BLOCK_N == 0))
                      and q.dtype in TRITON_DTYPES and q.shape[-1] in TRITON_HEAD_DIMS)
        if not graph_safe:
            n = int(valid_len.reshape(()))  # host read: fine outside a graph
            if not Sq <= n <= k.shape[2]:
                raise DamError(f"valid_len {n} must cover the {Sq} query rows and fit the cache of {k.shape[2]} slots")
            return sparse_attention(q, k[:, :, :n], v[:, :, :n], profile, layer, start=n - Sq, backend=backend,
                                    scale=scale, dynamic=dyn)
        _check(q, k, v, profile, layer, k.shape[2] - q.shape[2])  # shapes only: positions live on the device
        _check_triton(q, k, v)
        out = _triton_attention(q, k, v, profile, layer, 0, scale, dyn, valid_len=valid_len.reshape(1),
                                block_sums=block_sums)
        return _with_full_heads(out, q, k, v, profile, layer, 0, scale, valid_len=valid_len)
    _check(q, k, v, profile, layer, start)
    if backend == "auto":
        # Head dims or dtypes the kernels do not cover fall back to the exact reference.
        fits = q.dtype in TRITON_DTYPES and q.shape[-1] in TRITON_HEAD_DIMS
        backend = "triton" if q.is_cuda and fits else "reference"
    if backend == "reference":
        from dam_kernels.reference import reference_attention

        rows_fn = lambda rows, n, k0=0: profile.mask_rows(layer, rows, n, k0)  # noqa: E731
        if dyn is not None:
            from dam_kernels.dynamic import dynamic_rows, select_blocks

            chosen = select_blocks(q, k, start, dyn.topk, dyn.block, tail_topk=dyn.tail_topk, score=dyn.score)
            static_fn = rows_fn
            rows_fn = lambda rows, n: static_fn(rows, n).to(q.device) | dynamic_rows(chosen, rows, n, dyn.block)  # noqa: E731
        # Static masks without retrieval heads never reach the middle of a long sequence.
        full_heads = getattr(profile, "full_heads", None)
        span = profile.pcl if dyn is None and (full_heads is None or not bool(full_heads[layer].any())) else None
        return reference_attention(q, k, v, rows_fn, start=start, scale=scale, key_span=span)
    _check_triton(q, k, v)
    out = _triton_attention(q, k, v, profile, layer, start, scale, dyn)
    return _with_full_heads(out, q, k, v, profile, layer, start, scale)
