"""Left-padded batches in `dam` and `dam_dense` attention: the mask function that recognises them
(`batch_mask`, registered by `dam_cli.runtime.backend`) and the row-by-row call (`each_row`).

DAM masks are position-based from a sequence's first token, so a row with `p` leading pad slots must
see exactly what it would see alone: its own real keys, positions counted from its first real token.
`batch_mask` reads each row's pad count from the 2-D attention mask transformers passes (one host read
per forward); the attention functions then run each row on its unpadded slice; padded query rows get zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dam_cli.errors import DamError
from dam_cli.runtime.masking import WindowMask, dam_mask


@dataclass(frozen=True)
class PaddedMask:
    """What `batch_mask` returns for a left-padded batch: each row's leading pad slots (`pads[b]`, from
    slot 0 of the cache) and what `dam_mask` gives for the layer itself (None or a `WindowMask`)."""

    pads: tuple[int, ...]
    inner: WindowMask | None = None


def left_pads(attention_mask) -> tuple[int, ...] | None:
    """Each row's leading zeros of a 2-D attention mask `[B, Sk]`, or None when it has no zero.

    Raises DamError unless every row is zeros then ones (left padding) with at least one real token.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    m = attention_mask.bool()
    pads = m.shape[-1] - m.sum(-1)
    left = torch.arange(m.shape[-1], device=m.device)[None, :] >= pads[:, None]
    pads_host = tuple(int(p) for p in pads.tolist())
    if not any(pads_host):
        return None
    if not torch.equal(m, left):
        raise DamError("dam attention takes left-padded batches only (each attention-mask row: zeros, then ones): "
                       "pad on the left (tokenizer(..., padding_side='left'))")
    if max(pads_host) >= m.shape[-1]:
        raise DamError(f"row {pads_host.index(m.shape[-1])} of the batch is all padding: give every row a token")
    return pads_host


def batch_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
               **kwargs):
    """AttentionMaskInterface function of `dam` and `dam_dense`: `dam_mask`, which builds no mask, and for a
    left-padded 2-D `attention_mask` a `PaddedMask` around it (any other padding is refused)."""
    pads = left_pads(attention_mask)
    inner = dam_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                     attention_mask=None if pads is not None else attention_mask, **kwargs)
    return inner if pads is None else PaddedMask(pads, inner)


def each_row(attend, query, key, value, pads: tuple[int, ...], start: int, key_start: int) -> torch.Tensor:
    """`attend(q, k, v, start, key_start)` for each batch row `b` alone on its real tokens, the `pads[b]`
    leading slots cut and positions counted from its first real token; padded query rows get zeros.

    query `[B, H, Sq, D]` holds slots `start ..`, key / value `[B, H_kv, Sk, D]` slots `key_start ..`.
    """
    out = torch.zeros_like(query)
    Sq = query.shape[2]
    for b, p in enumerate(pads):
        r0, c0 = max(0, p - start), max(0, p - key_start)  # the first real query row and key column
        if r0 < Sq:
            out[b : b + 1, :, r0:] = attend(query[b : b + 1, :, r0:], key[b : b + 1, :, c0:], value[b : b + 1, :, c0:],
                                            start + r0 - p, key_start + c0 - p)
    return out
