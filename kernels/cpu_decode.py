"""DAM attention on the CPU in C for rows that lie in one query block (`cpu_decode.c`): a decode step, or a prompt
of one block. The compiled peer of the gathered path's decode (`gathered._decode_one`), built into the library of
`cpu_sparse.py` (compiled once per machine, loaded with ctypes). Exact like the reference up to float rounding.

One call reads each key once for the query heads of its kv head, chooses the dynamic part's blocks by the exact
attention mass of those same scores (`by_mass`, as `dynamic.mass_select` does) or takes the caller's `chosen`,
and reads the value rows of the keys a row allows only. Calls it takes (`supports`): float32 or bfloat16 on the
CPU, head dims a multiple of 16 up to 256, no soft-capping, the dynamic part (if any) in blocks of 64, rows in one
block of 64.
"""

from __future__ import annotations

import ctypes

import torch

from . import cpu_sparse

BLOCK = cpu_sparse.BLOCK
# Scores held at once (rows x heads x keys, float32): past this a call stays on the gathered path (a decode step
# at 131K with 32 heads holds 4M; only a block of many rows at long lengths comes near).
MAX_SCORES = 1 << 26
KV_DTYPES = (torch.float32, torch.bfloat16)  # the cache's dtypes the kernel reads in place (q is made float32)


def _function():
    """The library's `dam_cpu_decode` with its signature, or None where the library is not available."""
    if cpu_sparse.load() is None:
        return None
    fn = cpu_sparse._STATE["decode"]
    if fn.argtypes is None:
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        fn.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, i32, ptr, i64, i64, i32, i32, i32, i32, i64, i32,
                       ctypes.c_float, ptr, ptr, ptr, i32, i32, ptr, i64, ptr, i32, ctypes.c_double, i32, ptr, i32]
        fn.restype = i32
    return fn


def supports(q: torch.Tensor, k: torch.Tensor, *, start: int, dyn_block: int = 0, softcap=None) -> bool:
    """Whether `cpu_decode_attention` takes this call (module doc); the library is not loaded here."""
    _, H, Sq, D = q.shape
    return (q.device.type == "cpu" and q.dtype in KV_DTYPES and k.dtype in KV_DTYPES and D % 16 == 0
            and D <= 256 and softcap is None and dyn_block in (0, BLOCK)
            and start // BLOCK == (start + Sq - 1) // BLOCK and H * Sq * (start + Sq) <= MAX_SCORES)


def cpu_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks, *, start: int,
                         scale: float | None = None, chosen: torch.Tensor | None = None,
                         by_mass: tuple[float, int] | None = None, full_heads: torch.Tensor | None = None,
                         window: int | None = None, key_start: int = 0, threads: int | None = None,
                         chosen_out: torch.Tensor | None = None) -> torch.Tensor:
    """DAM attention of rows `start .. start + Sq - 1` (in one query block of 64) over keys `key_start ..
    start + Sq - 1`: q `[B, H, Sq, D]`, k, v `[B, H_kv, Sk, D]` (`k[:, :, t]` is position `key_start + t`;
    with `key_start` > 0 every row's window must begin at or after it); `masks` the layer's `DeviceMasks`.
    The dynamic part: `by_mass` = (gamma, cap), chosen here by the exact-mass rule (written into `chosen_out`, bool
    `[B, H, qb + 1]`, when given), else `chosen` bool `[B, H, nK]` in blocks of 64, else none. `full_heads` bool
    `[H]`: heads that see every causal key (the retrieval heads). `window` W: row i keeps keys j > i - W only.
    q, k and v in float32 or bfloat16 (k and v read in place, widened exactly; products and sums in float32).
    Returns `[B, H, Sq, D]` in q's dtype. Raises RuntimeError where the library is not available, MemoryError when it
    runs out of memory."""
    fn = _function()
    if fn is None:
        raise RuntimeError(f"the compiled CPU kernel is not available: {cpu_sparse._STATE.get('why')}")
    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    if key_start + Sk != start + Sq:
        raise ValueError(f"keys from {key_start} ({Sk} of them) must end at the last row, position {start + Sq - 1}")
    scale = D**-0.5 if scale is None else scale
    if v.dtype != k.dtype:
        raise ValueError(f"k and v must share a dtype, got {k.dtype} and {v.dtype}")
    dtype = q.dtype
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q.float(), k, v))
    out = torch.empty(B, H, Sq, D, dtype=torch.float32)
    mw, ow, cw = masks.mask_words, masks.offset_words, cpu_sparse.column_words(masks)
    fh = full_heads.to(torch.uint8).contiguous() if full_heads is not None and bool(full_heads.any()) else None
    gamma, cap = (float(by_mass[0]), int(by_mass[1])) if by_mass is not None else (-1.0, 0)
    qb = start // BLOCK
    picked = torch.zeros(H, qb + 1, dtype=torch.uint8) if by_mass is not None and chosen_out is not None else None
    n_threads = torch.get_num_threads() if threads is None else threads
    for b in range(B):
        ch = chosen[b].to(torch.uint8).contiguous() if chosen is not None and by_mass is None else None
        rc = fn(q[b].data_ptr(), q.stride(1), q.stride(2), k[b].data_ptr(), k.stride(1), k.stride(2),
                v[b].data_ptr(), v.stride(1), v.stride(2), int(k.dtype == torch.bfloat16),
                out[b].data_ptr(), out.stride(1), out.stride(2),
                H, H_kv, Sq, start, key_start, D, float(scale) * 1.4426950408889634,
                mw.data_ptr(), ow.data_ptr(), cw.data_ptr(), masks.pcl, mw.shape[-1],
                fh.data_ptr() if fh is not None else None, window or 0,
                ch.data_ptr() if ch is not None else None, ch.shape[-1] if ch is not None else 0, gamma, cap,
                picked.data_ptr() if picked is not None else None, n_threads)
        if rc != 0:
            raise MemoryError("the compiled CPU kernel could not allocate its scratch memory")
        if picked is not None:
            chosen_out[b].copy_(picked.bool())
    return out if dtype == torch.float32 else out.to(dtype)
