"""The true mask's two stored layouts, converted a block of rows at a time (never an `L x L` array).

Schema 1 stores each head's mask row-packed, `[L, ceil(L/8)]` bytes; schema 2 its causal triangle,
row-major and bit-packed, `ceil(L(L+1)/16)` bytes (docs/reference/profile-format.md). Blocks start
at multiples of 16 rows, where the triangle's bits start on a whole byte, and hold about
`BLOCK_CELLS` cells over all heads, so memory stays a few MB whatever `L` is. Pure numpy, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

BLOCK_CELLS = 1 << 22  # bools in one block of rows over all heads (4 MB); so a block has at most 2048 rows
ROW_ALIGN = 16  # causal_pairs(i) is a multiple of 8 when i is a multiple of 16


def causal_pairs(L: int) -> int:
    """Number of causal pairs (key <= query) of one head at PCL `L`: the bits of its schema-2 mask."""
    return L * (L + 1) // 2


def row_blocks(L: int, heads: int = 1) -> Iterator[tuple[int, int]]:
    """Row ranges `(i0, i1)` covering `0 .. L-1` in order, each `i0` a multiple of 16 and each block
    about `BLOCK_CELLS / heads` cells."""
    n = max(ROW_ALIGN, BLOCK_CELLS // max(1, heads * L) // ROW_ALIGN * ROW_ALIGN)
    for i0 in range(0, L, n):
        yield i0, min(L, i0 + n)


def lower_cells(i0: int, i1: int, L: int) -> np.ndarray:
    """Bool `[i1 - i0, L]`: the causal cells (key `j <= i`) of rows `i0 .. i1-1`."""
    return np.arange(L)[None, :] <= np.arange(i0, i1)[:, None]


def triangle_bytes(i0: int, i1: int) -> tuple[int, int]:
    """Byte range `[start, end)` of one schema-2 head holding rows `i0 .. i1-1` (`i0` a multiple of 16)."""
    assert i0 % ROW_ALIGN == 0, i0
    return causal_pairs(i0) // 8, (causal_pairs(i1) + 7) // 8


def unpack_triangle_rows(chunk: np.ndarray, i0: int, i1: int, L: int) -> np.ndarray:
    """Schema-2 bytes `chunk[..., triangle_bytes(i0, i1)]` to the rows `i0 .. i1-1`, bool `[..., n, L]`."""
    bits = np.unpackbits(chunk, axis=-1, count=causal_pairs(i1) - causal_pairs(i0), bitorder="little")
    out = np.zeros((*chunk.shape[:-1], i1 - i0, L), dtype=np.bool_)
    s = 0
    for a, i in enumerate(range(i0, i1)):  # row i holds keys 0 .. i: slices copy far faster than a bool mask
        out[..., a, :i + 1] = bits[..., s:s + i + 1]
        s += i + 1
    return out


def pack_triangle_rows(m: np.ndarray, i0: int) -> np.ndarray:
    """Inverse of `unpack_triangle_rows`: rows `i0 ..` as bool `[..., n, L]` to their schema-2 bytes."""
    n = m.shape[-2]
    bits = np.empty((*m.shape[:-2], causal_pairs(i0 + n) - causal_pairs(i0)), dtype=np.bool_)
    s = 0
    for a, i in enumerate(range(i0, i0 + n)):
        bits[..., s:s + i + 1] = m[..., a, :i + 1]
        s += i + 1
    return np.packbits(bits, axis=-1, bitorder="little")


def unpack_rows(rows: np.ndarray, L: int) -> np.ndarray:
    """Row-packed uint8 `[..., n, ceil(L/8)]` to bool `[..., n, L]`."""
    return np.unpackbits(rows, axis=-1, count=L, bitorder="little").view(np.bool_)


def rows_to_triangle(rows: np.ndarray, L: int) -> np.ndarray:
    """Row-packed uint8 `[N_L, H, L, ceil(L/8)]` to the schema-2 layout uint8 `[N_L, H, ceil(L(L+1)/16)]`:
    each head's lower triangle (diagonal included) row by row, packed little bit order, zero padding."""
    NL, H = rows.shape[:2]
    out = np.empty((NL, H, (causal_pairs(L) + 7) // 8), dtype=np.uint8)
    for i0, i1 in row_blocks(L, H):
        b0, b1 = triangle_bytes(i0, i1)
        for layer in range(NL):
            out[layer, :, b0:b1] = pack_triangle_rows(unpack_rows(rows[layer, :, i0:i1], L), i0)
    return out


def triangle_to_rows(packed: np.ndarray, L: int,
                     visit: Callable[[int, int, np.ndarray], None] | None = None) -> np.ndarray:
    """Inverse of `rows_to_triangle`: schema-2 uint8 `[N_L, H, ceil(L(L+1)/16)]` to row-packed
    uint8 `[N_L, H, L, ceil(L/8)]`, every bit above the diagonal zero. `visit(layer, i0, block)`, when
    given, sees each unpacked block of rows, bool `[H, n, L]` (the loader counts cells there, no second unpack)."""
    NL, H = packed.shape[:2]
    out = np.empty((NL, H, L, (L + 7) // 8), dtype=np.uint8)
    for i0, i1 in row_blocks(L, H):
        b0, b1 = triangle_bytes(i0, i1)
        for layer in range(NL):
            m = unpack_triangle_rows(packed[layer, :, b0:b1], i0, i1, L)
            out[layer, :, i0:i1] = np.packbits(m, axis=-1, bitorder="little")
            if visit is not None:
                visit(layer, i0, m)
    return out


def noncausal_rows(rows: np.ndarray, i0: int, L: int) -> bool:
    """Whether row-packed rows `i0 ..` (uint8 `[..., n, ceil(L/8)]`) set a key after their query."""
    i1 = i0 + rows.shape[-2]
    upper = np.packbits(~lower_cells(i0, i1, L), axis=-1, bitorder="little")  # "keys after i", packed
    return bool(np.bitwise_and(rows, upper).any())


def noncausal_layer(rows: np.ndarray, L: int) -> int | None:
    """The first layer whose row-packed mask `[N_L, H, L, ceil(L/8)]` has a bit above the diagonal, or None."""
    for layer in range(rows.shape[0]):
        if any(noncausal_rows(rows[layer, :, i0:i1], i0, L) for i0, i1 in row_blocks(L, rows.shape[1])):
            return layer
    return None
