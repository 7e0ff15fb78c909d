"""The tensor data of a profile file: byte ranges, memory, reading (part of the format, see format.py).

`check_spans` refuses what the reference safetensors reader refuses (shapes that are not integers,
negative, reversed, overlapping or gapped offsets, bytes after the last tensor) and files cut
short; `check_memory` refuses a load that needs more memory than is available, before anything is
allocated; `read_tensor` reads one tensor straight into its array; `StoredMask` leaves the true
mask in the file and reads it a block of rows at a time, for checks of any PCL in a few MB.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from dam_cli.artifact.triangle import (
    causal_pairs,
    noncausal_rows,
    row_blocks,
    triangle_bytes,
    unpack_rows,
    unpack_triangle_rows,
)
from dam_cli.errors import DamError
from dam_cli.memory import available_memory
from dam_cli.text import human_bytes, safe_text

DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I64": np.int64, "F32": np.float32}  # safetensors name -> numpy


def invalid(path: str, what: str) -> DamError:
    """The one-line error for a file that is not a valid profile."""
    return DamError(f"{safe_text(path)} is not a valid DAM profile: {what}")


def is_int(v: Any) -> bool:
    """A whole number (Python's or numpy's), not a bool."""
    import numbers

    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def shown(v: Any) -> str:
    """A value from the file for a message: escaped, at most 40 characters."""
    text = safe_text(json.dumps(v, ensure_ascii=False))  # strings quoted, so "0.5" is not read as 0.5
    return text if len(text) <= 40 else text[:37] + "..."


def tensor_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize  # Python ints: no overflow


def check_spans(path: str, header: dict[str, Any], want: dict[str, tuple[str, tuple[int, ...]]], start: int,
                size: int) -> dict[str, tuple[int, int]]:
    """Name -> `(first, end)` byte offsets in the data section of each tensor of `want`, after checking
    dtype, shape and offsets of each, then that they tile the data section exactly (no overlap, gap
    or trailing byte, as safetensors requires). `DamError` naming the first defect."""
    spans: dict[str, tuple[int, int]] = {}
    for name, (dt, shape) in want.items():
        info = header[name]
        if not isinstance(info, dict):
            raise invalid(path, f"tensor {name} is described by {shown(info)}, not a JSON object")
        found = info.get("shape")
        if not (isinstance(found, list) and all(is_int(d) and d >= 0 for d in found)):
            raise invalid(path, f"tensor {name} has shape {shown(found)}: a shape is a list of integers >= 0")
        if info.get("dtype") != dt or tuple(found) != shape:
            raise invalid(path, f"tensor {name} should be {dt} {list(shape)}, found {shown(info.get('dtype'))} "
                          f"{shown(found)}")
        offs = info.get("data_offsets")
        if not (isinstance(offs, list) and len(offs) == 2 and all(is_int(o) for o in offs)):
            raise invalid(path, f"tensor {name} has data_offsets {shown(offs)}: two integers expected")
        first, end = offs
        if first < 0:
            raise invalid(path, f"tensor {name} starts at a negative offset ({first})")
        if end < first:
            raise invalid(path, f"tensor {name} ends (at byte {end}) before it starts (at byte {first})")
        need = tensor_bytes(dt, shape)
        if end - first != need:
            raise invalid(path, f"tensor {name} spans {end - first:,} bytes, but {dt} {list(shape)} needs {need:,}")
        if start + end > size:
            raise invalid(path, f"tensor {name} runs past the end of the file (truncated at {size} bytes)")
        spans[name] = (first, end)
    order = sorted(spans, key=lambda n: (spans[n], n))
    for a, b in zip(order, order[1:]):
        if spans[b][0] < spans[a][1]:
            raise invalid(path, f"tensors {a} and {b} overlap")
    covered = 0
    for name in order:
        if spans[name][0] != covered:
            raise invalid(path, f"{spans[name][0] - covered:,} bytes before tensor {name} belong to no tensor "
                          "(safetensors readers refuse gaps)")
        covered = spans[name][1]
    if start + covered != size:
        raise invalid(path, f"{size - start - covered:,} bytes follow the last tensor ({order[-1]}): safetensors "
                      f"readers refuse them (the file should end at byte {start + covered:,})")
    return spans


def check_memory(path: str, need: int, what: str) -> None:
    """Refuse, before allocating, to `what` (e.g. "load it") when that needs more than the memory available."""
    have = available_memory()
    if have is not None and need > have:
        raise DamError(f"{safe_text(path)} needs about {human_bytes(need)} of memory to {what}, more than the "
                       f"{human_bytes(have)} available: `dam inspect --check` checks it a block at a time; "
                       "anything else needs a machine with more memory")


def read_tensor(path: str, f: IO[bytes], offset: int, name: str, dt: str, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor read from `offset` straight into its array (no second copy); BOOL bytes must be 0 or 1."""
    raw = np.empty(tensor_bytes(dt, shape), dtype=np.uint8)
    f.seek(offset)
    if f.readinto(memoryview(raw)) != raw.size:
        raise invalid(path, f"tensor {name} is truncated (the file changed while it was read?)")
    if dt == "BOOL" and raw.size and raw.max() > 1:
        raise invalid(path, f"tensor {name} holds bytes other than 0 and 1")
    return raw.view(DTYPES[dt]).reshape(shape)


def padding_set(stored_last: np.ndarray, used_bits: int) -> bool:
    """Whether a packed mask's last bytes (`uint8`, any shape) set a bit beyond the first `used_bits` of 8."""
    return bool(used_bits and (stored_last >> used_bits).any())


@dataclass(frozen=True)
class StoredMask:
    """A checked profile's true mask left in its file, read a block of rows at a time (a few MB)."""

    path: str
    offset: int  # absolute file offset of the true_mask tensor
    schema: int
    n_layers: int
    n_heads: int
    pcl: int

    def row_blocks(self, layer: int) -> Iterator[tuple[int, np.ndarray]]:
        """`(i0, bool [H, n, L])`: rows `i0 .. i0+n-1` of every head of `layer`, in order. `DamError` on
        a set padding bit or (schema 1) a key after its query, the checks `load_arrays` makes."""
        H, L = self.n_heads, self.pcl
        with open(self.path, "rb") as f:
            for i0, i1 in row_blocks(L, H):
                if self.schema == 1:
                    rb = (L + 7) // 8
                    chunk = self._read(f, [((layer * H + h) * L + i0) * rb for h in range(H)], (i1 - i0) * rb)
                    chunk = chunk.reshape(H, i1 - i0, rb)
                    if padding_set(chunk[..., -1], L % 8):
                        raise invalid(self.path, "padding bits of the packed true mask are set")
                    if noncausal_rows(chunk, i0, L):
                        raise invalid(self.path, f"the true mask of layer {layer} is not causal (a key after its "
                                      "query is set)")
                    yield i0, unpack_rows(chunk, L)
                else:
                    per_head = (causal_pairs(L) + 7) // 8
                    b0, b1 = triangle_bytes(i0, i1)
                    chunk = self._read(f, [(layer * H + h) * per_head + b0 for h in range(H)], b1 - b0)
                    if i1 == L and padding_set(chunk[:, -1], causal_pairs(L) % 8):
                        raise invalid(self.path, "padding bits of the packed true mask are set")
                    yield i0, unpack_triangle_rows(chunk, i0, i1, L)

    def _read(self, f: IO[bytes], starts: list[int], n: int) -> np.ndarray:
        out = np.empty((len(starts), n), dtype=np.uint8)
        for k, s in enumerate(starts):
            f.seek(self.offset + s)
            if f.readinto(memoryview(out[k])) != n:
                raise invalid(self.path, "the true mask is truncated (the file changed while it was read?)")
        return out
