"""The word tables the kernels read of one profile layer (`DeviceMasks`): the true mask `M` of rows below L as
64-bit words, the matched offsets as words indexed by a row's distance to a key block, and the matched columns.

Built from unpacked bools (`kernel_tables`) or, for the mask, straight from a profile's packed bytes
(`mask_words_from_packed`). Pure tensor code on the CPU; `layout.device_masks` caches them per layer and device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceMasks:
    """One layer's profile in the form the kernels read: 64-bit words, one load per tile row.

    `mask_words[h, i, w]` bit `b` = `M[i, 64w + b]` or `64w + b == i` (rows below L, with the
    diagonal guard). `offset_words[h, e]` bit `t` = `(e - t)` is a matched offset or 0 (the guard),
    for `0 <= e - t < L`: the offsets seen by a row `i >= L` against keys `k0 + t` with
    `e = i - k0`. `columns[h, j]` is 1 where column `j` is matched. Words are int64 (bit 63 is
    the sign bit; kernels shift and mask, so the sign never matters).
    """

    mask_words: torch.Tensor  # [H, L, ceil(L/64)] int64
    offset_words: torch.Tensor  # [H, L + 64] int64
    columns: torch.Tensor  # [H, L] uint8 (0/1)
    pcl: int  # L

    def to(self, device) -> DeviceMasks:
        return DeviceMasks(self.mask_words.to(device), self.offset_words.to(device),
                           self.columns.to(device), self.pcl)


_BYTE_GATHER = 0x0102040810204080  # times 8 bytes of 0/1: byte u's bit lands on bit 56 + u, nothing else does


def _pack64(bits: torch.Tensor) -> torch.Tensor:
    """bool `[..., 64]` -> int64 `[...]`, bit t from element t (two's complement for bit 63).

    Eight bools at a time: read as one int64 (byte u = element u), one multiply gathers their
    low bits into the top byte (the other partial products fall below bit 56 or past bit 63)."""
    bits = bits.contiguous()
    if bits.storage_offset() % 8:  # an int64 view needs 8-byte aligned storage
        bits = bits.clone()
    eights = bits.view(torch.uint8).view(torch.int64)  # [..., 8]
    packed = ((eights * _BYTE_GATHER) >> 56) & 0xFF
    return packed.to(torch.uint8).view(torch.int64).squeeze(-1)


def kernel_tables(
    true_mask: torch.Tensor,  # [H, L, L] bool, causal
    offsets: torch.Tensor,  # [H, L] bool
    columns: torch.Tensor,  # [H, L] bool
) -> DeviceMasks:
    """The kernels' word tables of one layer, on the CPU (see `DeviceMasks`)."""
    H, L, _ = true_mask.shape
    NW = -(-L // 64)
    m = torch.nn.functional.pad(true_mask.bool().tril(), (0, NW * 64 - L))  # causal whatever the input
    m[:, torch.arange(L), torch.arange(L)] = True
    return _tables(_pack64(m.view(H, L, NW, 64)), offsets, columns)


def tables_from_packed(
    packed: torch.Tensor,  # [H, L, ceil(L/8)] uint8: the true mask, eight bools per byte in little bit order
    offsets: torch.Tensor,  # [H, L] bool
    columns: torch.Tensor,  # [H, L] bool
) -> DeviceMasks:
    """`kernel_tables` from a true mask packed as profiles store it, without unpacking it to bools."""
    return _tables(mask_words_from_packed(packed, offsets.shape[-1]), offsets, columns)


def _tables(mask_words: torch.Tensor, offsets: torch.Tensor, columns: torch.Tensor) -> DeviceMasks:
    return DeviceMasks(mask_words.contiguous(), offset_words_of(offsets), columns.to(torch.uint8).contiguous(),
                       offsets.shape[-1])


def offset_words_of(offsets: torch.Tensor) -> torch.Tensor:
    """`DeviceMasks.offset_words` `[H, L + 64]` of the matched offsets `[H, L]` (offset 0, the guard, always set)."""
    L = offsets.shape[-1]
    r = offsets.bool().clone()
    r[:, 0] = True
    d = torch.arange(L + 64)[:, None] - torch.arange(64)[None, :]  # [L + 64, 64]: offset e - t
    bits = r[:, d.clamp(0, L - 1)] & ((d >= 0) & (d < L))
    return _pack64(bits).contiguous()


_CAUSAL_WORDS: dict = {}


def _causal_words(L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, diag) int64 `[L, ceil(L/64)]`: row i's words of keys `<= i`, and of key i alone (made once per L)."""
    hit = _CAUSAL_WORDS.get(L)
    if hit is None:
        NW = -(-L // 64)
        j = torch.arange(NW * 64).view(NW, 64)[None]
        i = torch.arange(L)[:, None, None]
        hit = _CAUSAL_WORDS[L] = (_pack64(j <= i), _pack64(j == i))
        if len(_CAUSAL_WORDS) > 16:
            _CAUSAL_WORDS.clear()
    return hit


def mask_words_from_packed(packed: torch.Tensor, L: int) -> torch.Tensor:
    """`DeviceMasks.mask_words` `[H, L, ceil(L/64)]` from a true mask packed eight bools per byte in little bit
    order (`[H, L, ceil(L/8)]` uint8, as profiles store it): the bytes read as words, cut to the causal part, the
    diagonal guard set. Equal to `kernel_tables`'s words without unpacking to one bool per pair."""
    H = packed.shape[0]
    NW = -(-L // 64)
    b = torch.nn.functional.pad(packed, (0, NW * 8 - packed.shape[-1])).contiguous()
    keep, diag = _causal_words(L)
    return (b.view(torch.int64).view(H, L, NW) & keep) | diag
