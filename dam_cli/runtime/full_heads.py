"""The heads a profile keeps on full attention (the retrieval-heads option): every causal key, within the
layer's window.

Two ways to compute them: `full_head_flags` hands them to the split-K decode kernel, which sweeps every key
block for a kv group holding one (the keys and values read in place, once per group); `with_full_heads`
recomputes them after the fact on dense attention (prefill chunks, the CPU, the reference), gathering only the
kv heads they read.
"""

from __future__ import annotations

import torch

from dam_cli.runtime.dense import masked_dense_attention, rows_causal_mask

_HEAD_INDEX: dict = {}
_HEAD_FLAGS: dict = {}


def _head_index(heads: list[int], device: torch.device) -> torch.Tensor:
    """The retrieval heads as an index tensor on `device`, made once (a CUDA graph capture may
    not copy from the host)."""
    key = (tuple(heads), str(device))
    if key not in _HEAD_INDEX:
        _HEAD_INDEX[key] = torch.tensor(heads, device=device)
    return _HEAD_INDEX[key]


def full_head_flags(profile, layer: int, device: torch.device, n_kv_heads: int) -> dict:
    """`dam_kernels.decode.dam_decode`'s keywords for the heads of `layer` on full attention: `full`, uint8 `[H]`
    on `device` (1 for those heads), and `full_groups`, how many of the `n_kv_heads` kv groups hold one; empty
    when the layer has none. Made once per profile tensor, layer and device: a decode step reads them on every
    layer, and a CUDA graph capture may not copy from the host (the eager step before it makes them)."""
    full_heads = getattr(profile, "full_heads", None)
    if full_heads is None:
        return {}
    key = (id(full_heads), layer, str(device), n_kv_heads)
    kept = _HEAD_FLAGS.get(key)
    if kept is None or kept[0] is not full_heads:  # the tensor is held with its entry, so its id is not reused
        row = full_heads[layer]
        kw = {}
        if bool(row.any()):
            kw = {"full": row.to(device=device, dtype=torch.uint8),
                  "full_groups": int(row.reshape(n_kv_heads, -1).any(1).sum())}
        kept = _HEAD_FLAGS[key] = (full_heads, kw)
    return kept[1]


def full_heads_overlay(out, q, k, v, heads: list[int], start: int, scale: float | None,
                       valid_len: torch.Tensor | None = None, window: int | None = None,
                       softcap: float | None = None, key_start: int = 0) -> None:
    """Recompute the retrieval heads (the full-heads option) on full attention, in place: every
    causal key (within the layer's `window`, scores soft-capped by `softcap`, as the model does).

    Only the kv heads those query heads read are gathered; the others are never copied. With
    `valid_len` (a static cache), the causal limit of each row is computed on the device.
    """
    B, H, Sq, D = q.shape
    G = H // k.shape[1]
    idx = _head_index(heads, q.device)
    qs, ks, vs = q[:, idx], k[:, idx // G], v[:, idx // G]
    Sk = k.shape[2]
    plain = window is None and softcap is None and key_start == 0
    if plain and valid_len is None and start == 0:
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
    else:  # rows see keys up to their own position
        first = valid_len.reshape(()) - Sq if valid_len is not None else start
        allowed = rows_causal_mask(first, Sq, Sk, q.device, window=window, key_start=key_start)
        if softcap is None:
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
        else:
            o = masked_dense_attention(qs, ks, vs, allowed, scale, softcap)
    out[:, idx] = o.to(out.dtype)


def with_full_heads(out, q, k, v, profile, layer: int, start: int, scale: float | None,
                    valid_len: torch.Tensor | None = None, **window_softcap) -> torch.Tensor:
    """`out` with the profile's retrieval heads of `layer` (if any) recomputed on full attention;
    `window_softcap`: the layer's `window`, `softcap` and `key_start`, as `full_heads_overlay` takes them."""
    full_heads = getattr(profile, "full_heads", None)
    if full_heads is not None and bool(full_heads[layer].any()):
        full_heads_overlay(out, q, k, v, full_heads[layer].nonzero().flatten().tolist(), start, scale,
                           valid_len=valid_len, **window_softcap)
    return out
