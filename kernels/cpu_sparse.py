"""Block-sparse DAM attention on the CPU in C (`cpu_sparse.c`): the online softmax over the key blocks each query
block keeps, the Stage-2 mask evaluated from the word tables in place, the dynamic selection and the retrieval
heads inside. Exact like the reference (`reference.py`) up to float rounding.

The CPU peer of the Triton prefill kernel. The PyTorch gathered path (`gathered.py`) gathers the kept blocks of a
kv head's query heads into one product with an additive mask built from the words: at 2K tokens it computes 70%
of the causal pairs (the union of three heads' lists) where 38% are allowed, and builds a float mask per group.
Here each head visits only its own blocks and a row's word becomes a lane mask in registers.

The source is compiled once per machine and source by the machine's C compiler (`$CC`, else `cc`, `gcc`) with
`-O3 -march=native -fopenmp` and the rest of `FLAGS` into the cache (`$DAM_CACHE/cpu-kernels`, else
`~/.cache/dam/cpu-kernels`; a temporary folder when that cannot be written), named by a hash of the sources,
the compiler's version and the CPU model, and loaded with ctypes. No compiler, a failed build or a failed load
makes `load()` return None: callers keep the PyTorch path (said once on stderr, with the reason).

Calls it takes (`supports`): float32 or bfloat16 (widened to float32 copies) on the CPU, batch 1, head dims a
multiple of 16 up to 256, no soft-capping, keys from position 0, the dynamic part (if any) in blocks of 64; a
sliding window cuts every row's keys to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .word_tables import _pack64

SOURCES = tuple(Path(__file__).with_name(f) for f in ("cpu_sparse.c", "cpu_antisum.c", "cpu_decode.c"))
HEADERS = tuple(Path(__file__).with_name(f) for f in ("cpu_vector.h", "cpu_words.h"))  # part of the build's hash
BLOCK = 64  # query and key block of the C kernel (one 64-bit word per row and key block)
# -ffp-contract=fast: fused multiply-adds (ISO C mode turns them off); on x86, 512-bit vectors where the machine has
# them (gcc prefers 256 on many Intel targets): together 1.5x the products' speed on the project's CPU.
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11",
         *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()))
_STATE: dict = {}  # "lib": the loaded library or None; "why": the reason it is None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_model() -> str:
    """The CPU's model name and instruction-set flags (what `-march=native` compiles for): part of the build's hash,
    so a cache folder shared by machines of one model name but other flags never hands one the other's build."""
    seen: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features") and key not in seen:
                    seen[key] = line
    except OSError:
        pass
    return "".join(seen.values()) or platform.processor() or platform.machine()


def cache_dir() -> Path:
    """Where compiled kernels are kept: `cpu-kernels` in the model cache's folder (`$DAM_CACHE`, else
    `~/.cache/dam`, as `dam_cli.runtime.model_cache` resolves it; kernels import nothing from dam_cli)."""
    return Path(os.environ.get("DAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dam")) / "cpu-kernels"


def _build(cc: str) -> Path:
    """The compiled library for this source, compiler and CPU: from the cache, else compiled into it (written
    under a temporary name, then renamed, so a concurrent build or a killed one never leaves half a file)."""
    src = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    tag = hashlib.sha256(src + version.encode() + _cpu_model().encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    failed = []  # a build that failed in a folder: the next folder is tried, and the reasons said in one line
    for folder in (cache_dir(), _private_temp_folder()):
        lib = folder / f"cpu_sparse-{tag}.so"
        if lib.exists() and _loadable(lib):
            return lib
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
        except OSError:
            continue
        try:
            run = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                                 timeout=300)
            if run.returncode == 0:
                os.replace(tmp, lib)
                return lib
            failed.append(f"{cc} failed in {folder}: {_compiler_reason(run.stderr or run.stdout)}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if failed:
        raise RuntimeError("; ".join(failed))
    raise OSError(f"no writable folder for the compiled kernel ({cache_dir()} nor {tempfile.gettempdir()})")


def _loadable(lib: Path) -> bool:
    """Whether a cached library loads; one that does not (cut short, damaged) is removed, to be built again."""
    try:
        ctypes.CDLL(str(lib))
        return True
    except OSError:
        with contextlib.suppress(OSError):
            lib.unlink()
        return False


def _private_temp_folder() -> Path:
    """The fallback folder in the temporary folder: `dam-cpu-kernels-UID` where this user owns it and nobody else
    may write to it (a library there is loaded and run), else a new private folder for this process."""
    folder = Path(tempfile.gettempdir()) / f"dam-cpu-kernels-{os.getuid()}"
    try:
        st = folder.lstat()
    except FileNotFoundError:
        return folder
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
        return folder
    try:
        return Path(tempfile.mkdtemp(prefix="dam-cpu-kernels-"))
    except OSError:  # no usable temporary folder: the build says so
        return folder


def _compiler_reason(output: str) -> str:
    """A failed compile's reason on one line: "no space left on the device" where the disk filled, else the last
    line the compiler wrote (cut to 200 characters)."""
    if "No space left on device" in output:
        return "no space left on the device"
    lines = [x.strip() for x in output.splitlines() if x.strip()]
    return (lines[-1] if lines else "no output")[:200]


def load():
    """The compiled attention kernel (a ctypes function), or None when it cannot be had here (module doc); once per
    process. The library's estimate (`cpu_antisum.c`) is kept as `_STATE["antisum"]`, its attention of rows in one
    query block (`cpu_decode.c`, whose signature `cpu_decode.py` sets) as `_STATE["decode"]`."""
    if "lib" in _STATE:
        return _STATE["lib"]
    fn, why, est, dec = None, None, None, None
    if os.environ.get("DAM_CPU_KERNEL", "1") == "0":
        why = "DAM_CPU_KERNEL=0"
    elif (cc := _compiler()) is None:
        why = "no C compiler (cc, gcc or $CC) on PATH"
    else:
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            fn, est, dec = lib.dam_cpu_sparse_attention, lib.dam_cpu_antisum, lib.dam_cpu_decode
            i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
            est.argtypes = [ptr, ptr, ptr, i32, i32, i32, i32, i64, i64, i32, i32, i32, i32, ptr, ptr, i32]
            est.restype = i32
            fn.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64, ptr, i64, i64, i32, i32, i32, i32, i32,
                           i32, ctypes.c_float, ptr, ptr, ptr, i32, i32, ptr, i32, i32, ptr, i64, i32]
            fn.restype = i32
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
            fn, est, dec, why = None, None, None, f"{type(e).__name__}: {e}"
    _STATE["lib"], _STATE["why"], _STATE["antisum"], _STATE["decode"] = fn, why, est, dec
    if fn is None and why != "DAM_CPU_KERNEL=0":
        print(f"dam: the compiled CPU kernel is not available ({why}); the CPU runs its PyTorch path (slower)",
              file=sys.stderr)
    return fn


def supports(q: torch.Tensor, *, dyn_block: int = 0, softcap=None, key_start: int = 0) -> bool:
    """Whether `cpu_sparse_attention` takes this call (module doc); the library is not loaded here."""
    D = q.shape[-1]
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and q.shape[0] == 1 and D % 16 == 0
            and D <= 256
            and softcap is None and key_start == 0 and dyn_block in (0, BLOCK))


_COLUMN_WORDS: dict = {}


def column_words(masks) -> torch.Tensor:
    """int64 `[H, ceil(L/64)]`: the matched columns of each key block below L as one word (made once per tables)."""
    key = id(masks.columns)
    hit = _COLUMN_WORDS.get(key)
    if hit is None or hit[0] is not masks.columns:
        H, L = masks.columns.shape
        nw = -(-L // 64)
        cols = torch.nn.functional.pad(masks.columns.bool(), (0, nw * 64 - L))
        if len(_COLUMN_WORDS) > 256:
            _COLUMN_WORDS.clear()
        hit = _COLUMN_WORDS[key] = (masks.columns, _pack64(cols.view(H, nw, 64)).contiguous())
    return hit[1]


def cpu_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks, *, start: int = 0,
                         scale: float | None = None, chosen: torch.Tensor | None = None,
                         full_heads: torch.Tensor | None = None, window: int | None = None,
                         threads: int | None = None) -> torch.Tensor:
    """DAM attention of rows `start .. start + Sq - 1` over keys `0 .. Sk - 1` (module doc): q `[1, H, Sq, D]`, k, v
    `[1, H_kv, Sk, D]` float32 or bfloat16; `masks` the layer's `DeviceMasks`; `chosen` bool `[1, H, nQ, nK]` in
    blocks of 64 (the dynamic part's selection) or None; `full_heads` bool `[H]` (retrieval heads: every causal key)
    or None; `window` W (a sliding-window layer): row i keeps only keys j > i - W, whatever its mask, selection or
    head.
    Returns `[1, H, Sq, D]` in q's dtype (a transposed view of `[1, Sq, H, D]`, the layout the model reads next).
    Raises RuntimeError when the library is not available (call `load()` first), MemoryError when it runs out of
    memory (the CLI's one line for sizes too large for the machine)."""
    fn = load()
    if fn is None:
        raise RuntimeError(f"the compiled CPU kernel is not available: {_STATE.get('why')}")
    _, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    if Sk < start + Sq:
        raise ValueError(f"{Sk} keys cannot cover rows up to position {start + Sq - 1}")
    scale = D**-0.5 if scale is None else scale
    dtype = q.dtype  # bfloat16 inputs are widened (exactly) to float32 copies; the output goes back to it
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q.float(), k.float(), v.float()))
    nkb = -(-Sk // BLOCK)
    kt = torch.nn.functional.pad(k[0], (0, 0, 0, nkb * BLOCK - Sk)).view(H_kv, nkb, BLOCK, D)
    kt = kt.transpose(-1, -2).contiguous()
    out = torch.empty(1, Sq, H, D, dtype=torch.float32).transpose(1, 2)
    mw, ow, cw = masks.mask_words, masks.offset_words, column_words(masks)
    ch = chosen[0].to(torch.uint8).contiguous() if chosen is not None else None
    fh = full_heads.to(torch.uint8).contiguous() if full_heads is not None and bool(full_heads.any()) else None
    n_threads = torch.get_num_threads() if threads is None else threads
    rc = fn(q.data_ptr(), q.stride(1), q.stride(2), k.data_ptr(), k.stride(1), k.stride(2), kt.data_ptr(),
            v.data_ptr(), v.stride(1), v.stride(2),
            out.data_ptr(), out.stride(1), out.stride(2), H, H_kv, Sq, start, Sk, D, float(scale) * 1.4426950408889634,
            mw.data_ptr(), ow.data_ptr(), cw.data_ptr(), masks.pcl, mw.shape[-1],
            ch.data_ptr() if ch is not None else None, ch.shape[1] if ch is not None else 0,
            ch.shape[2] if ch is not None else 0, fh.data_ptr() if fh is not None else None, window or 0, n_threads)
    if rc != 0:
        raise MemoryError("the compiled CPU kernel could not allocate its scratch memory")
    return out if dtype == torch.float32 else out.to(dtype)


def antisum_block_mass(q: torch.Tensor, k: torch.Tensor, start: int, block: int, stride: int = 8,
                       scale: float | None = None) -> torch.Tensor:
    """`dam_kernels.block_mass.antisum_block_mass` (every row group) in C (`cpu_antisum.c`): float32
    `[B, H, nQ, nK]`, the same estimate up to float rounding. Raises RuntimeError where the library is not
    available (`load()` is None), MemoryError when it runs out of memory."""
    from .block_mass import antidiag_blocks, group_presence

    load()
    est = _STATE.get("antisum")
    if est is None:
        raise RuntimeError(f"the compiled CPU kernel is not available: {_STATE.get('why')}")
    B, H, Sq, D = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    s = stride
    qb0, nQ, nK, scale = antidiag_blocks(q, k, start, block, stride, scale)
    base, R = qb0 * block, block // s
    n_groups, n_key_groups = (nQ - qb0) * R, -(-Sk // s)
    n_tiles = -(-n_key_groups // 64)
    present, groups = group_presence(start, Sq, qb0, nQ, block, s, q.device)
    out = torch.zeros(B, H, nQ, nK, dtype=torch.float32)
    present, groups = present.float().contiguous(), groups.float().contiguous()  # held while C reads them
    for b in range(B):  # row groups side by side, pre-scaled to log2 units; key groups last first, in tiles of 64
        qp = torch.zeros(H, n_groups * s, D, dtype=torch.float32)
        qp[:, start - base: start - base + Sq] = q[b].float() * (float(scale) / s * 1.4426950408889634)
        kp = torch.nn.functional.pad(k[b].float(), (0, 0, 0, n_tiles * 64 * s - Sk))
        kg = kp.view(H_kv, n_tiles, 64, s, D).flip(3).reshape(H_kv, n_tiles, 64, s * D)
        kgt = kg.transpose(-1, -2).contiguous()
        rc = est(qp.data_ptr(), kgt.data_ptr(), out[b].data_ptr(), H, H_kv, n_groups, s * D, base // s, n_key_groups,
                 R, qb0, nQ, nK, present.data_ptr(), groups.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise MemoryError("the compiled CPU estimate could not allocate its scratch memory")
    return out
