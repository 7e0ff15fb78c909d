"""`sparse_attention`: the one public entry point to DAM attention (docs/reference/api.md).

Dispatches to the Triton kernels (`dam_kernels`) on CUDA, on the CPU to the compiled block-sparse kernel
(`dam_kernels.cpu_sparse`: prefill calls, where a C compiler built it) and the block-sparse PyTorch path
(`dam_kernels.gathered`: the other calls), and to the PyTorch reference elsewhere; checks every shape
before any launch. On CUDA up to `DECODE_MAX_ROWS` query rows go to the split-K decode kernel (no
layout needed), longer chunks to the block-sparse prefill kernel.
"""

from __future__ import annotations

import math
import numbers
import os

import torch
from dam_kernels.selection import SELECT_HEAD_DIMS, DynamicSelection

from dam_cli.artifact.profile import Profile
from dam_cli.errors import DamError
from dam_cli.runtime.full_heads import full_head_flags, with_full_heads

BACKENDS = ("auto", "triton", "reference", "gathered", "compiled")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# What the Triton kernels compute; `triton_refusal` is the one place that reads it: windows, soft-capping and
# head dims 96 and 256 (their kernel tests pass compiled on the H200, docs/results/kernel-speed.md).
TRITON_WINDOW_SOFTCAP = True
TRITON_HEAD_DIMS = (16, 32, 64, 96, 128, 256) if TRITON_WINDOW_SOFTCAP else (16, 32, 64, 128)
DECODE_MAX_ROWS = 16  # query rows up to which the split-K decode kernel beats the prefill one
DECODE_BLOCK_N = 64  # the decode kernel's key block on CUDA: dynamic blocks under a CUDA graph are multiples of it
FUSED_SELECTION = True  # graph-loop decode steps select in fused launches (dam_kernels.select, select_mass)
FULL_HEADS_IN_DECODE = True  # decode calls compute the retrieval heads in the split-K kernel (False: dense, after)
MERGE_ONE_LAUNCH = True  # the Triton prefill merges its selection into its layout in one launch (merge_lists)


def _check(q, k, v, profile, layer: int, start: int, key_start: int = 0, positions: bool = True) -> None:
    """Shapes, dtypes, devices and the profile's fit; `positions` (off for a static cache, whose buffer may hold
    more slots than the model has positions: the filled count lives on the device) also the model's maximum."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise DamError(f"q, k and v must be 4-D [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Sq, D = q.shape
    if k.shape != v.shape:
        raise DamError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise DamError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head dim")
    if H % k.shape[1]:
        raise DamError(f"q has {H} heads, not a multiple of the {k.shape[1]} kv heads")
    if k.shape[2] != start + Sq - key_start:
        raise DamError(f"keys must cover positions {key_start}..start+Sq-1: Sk={k.shape[2]}, start={start}, Sq={Sq}")
    if start < 0 or not 0 <= key_start <= start:
        raise DamError(f"start must be >= 0 and key_start within 0..start, got start={start}, key_start={key_start}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise DamError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if H != profile.n_heads:
        raise DamError(f"q has {H} heads but the profile has {profile.n_heads} per layer: use a profile made for "
                       "this model")
    if not 0 <= layer < profile.n_layers:
        raise DamError(f"layer {layer} is out of range: the profile has layers 0..{profile.n_layers - 1}")
    if Sq < 1:
        raise DamError("q holds no query rows (Sq = 0): pass at least one position")
    if B < 1:
        raise DamError("q holds no sequences (batch size 0): pass at least one")
    if not (q.device == k.device == v.device):
        raise DamError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    max_pos = profile.meta.model.get("max_position") if isinstance(profile.meta.model, dict) else None
    if positions and isinstance(max_pos, int) and max_pos > 0 and start + Sq > max_pos:
        raise DamError(f"{start + Sq} positions exceed the model's maximum of {max_pos} (profile "
                       "metadata max_position): shorten the input")


def _check_types(q, k, v, profile, layer, start) -> None:
    """What the arguments are before what they hold: tensors of a floating dtype with a head dim, a loaded profile,
    integer layer and start (an int, float or bool passed there once failed deep inside, or quietly as layer 1)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise DamError(f"{name} must be a torch.Tensor [B, H, S, D], got {type(t).__name__}")
        if not t.is_floating_point():
            raise DamError(f"{name} must be floating point (float32, bfloat16, float16 or float64), got {t.dtype}")
        if t.dim() == 4 and t.shape[-1] < 1:
            raise DamError(f"{name} has head dim 0: {tuple(t.shape)}")
    if not isinstance(profile, Profile):
        raise DamError(f"profile must be a loaded Profile, got {type(profile).__name__}: load it once with "
                       "dam_cli.artifact.profile.load_profile(path)")
    for name, x in (("layer", layer), ("start", start)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise DamError(f"{name} must be an int, got {x!r}")


def _check_window(window, softcap, start: int, key_start: int) -> None:
    """The sliding window and soft-cap values, and a cut key range only where the window allows it."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise DamError(f"window must be a positive int (a sliding-window layer's width) or None, got {window!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise DamError(f"softcap must be a positive number or None, got {softcap!r}")
    if key_start and (window is None or start - window + 1 < key_start):
        raise DamError(f"the cache holds keys from position {key_start} only, but row {start} may attend earlier "
                       f"ones (window {window}): pass a cache that keeps every key (dam_cli.runtime.decode.new_cache)")


def triton_refusal(q, *, window: int | None = None, softcap: float | None = None, key_start: int = 0) -> str | None:
    """Why the Triton kernels cannot compute this call (a phrase for an error), or None when they can.

    The one predicate of Triton eligibility: `backend='auto'` runs the reference whenever it gives a reason.
    """
    if q.dtype not in TRITON_DTYPES:
        return f"takes float16, bfloat16 or float32, got {q.dtype}: cast q, k, v"
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        return f"supports head dims {TRITON_HEAD_DIMS}, got {q.shape[-1]}"
    if key_start:
        return "needs every key from position 0, and this cache dropped some (a sliding-window cache)"
    if not TRITON_WINDOW_SOFTCAP and (window is not None or softcap is not None):
        return "does not apply sliding windows or logit soft-capping yet"
    if q.is_cuda:
        from dam_kernels.prefill import prefill_fits, smem_bytes

        if not prefill_fits(q.shape[-1], q.element_size(), smem_bytes(q.device)):
            return (f"tiles at head dim {q.shape[-1]} in {q.dtype} need more shared memory than this GPU's "
                    f"{smem_bytes(q.device):,} bytes: use bfloat16 or float16")
    return None


def triton_runs_on_cpu() -> bool:
    """Whether Triton runs its kernels in the interpreter (`TRITON_INTERPRET=1`: CPU tensors, the tests' setting)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_triton(q, k, v, window: int | None = None, softcap: float | None = None, key_start: int = 0) -> None:
    """What the Triton kernels need beyond the shape rules: checked before any launch."""
    if not q.is_cuda and not triton_runs_on_cpu():
        raise DamError(f"backend 'triton' needs CUDA tensors, got {q.device}: use backend='reference' "
                       "(or 'auto') on this device")
    why = triton_refusal(q, window=window, softcap=softcap, key_start=key_start)
    if why is not None:
        raise DamError(f"backend 'triton' {why}: use backend='reference' (or 'auto')")
    D = q.shape[-1]
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
    from dam_kernels.prefill import prefill_blocks

    # 128 x 64 at head dims up to 128 (the H200 sweep, docs/results/kernel-speed.md); 64 x 64 at 256, whose
    # 128-row tiles need more shared memory than an H200 has (OutOfResources, seen in `dam eval` on Gemma 3).
    return prefill_blocks(D)


def _triton_attention(q, k, v, profile, layer: int, start: int, scale: float | None,
                      dyn: DynamicSelection | None = None, valid_len: torch.Tensor | None = None,
                      block_sums: torch.Tensor | None = None, window: int | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """The Triton path, retrieval heads included; `dyn` is the dynamic part when on (None: off); `window` /
    `softcap` reach every launcher, and only when set (launchers without them still run every other call)."""
    decode = FULL_HEADS_IN_DECODE and q.shape[2] <= DECODE_MAX_ROWS  # only the decode kernel takes the heads
    full = full_head_flags(profile, layer, q.device, k.shape[1]) if decode else {}
    out, heads_done = _triton_kernels(q, k, v, profile, layer, start, scale, dyn, valid_len, block_sums, window,
                                      softcap, full)
    if heads_done:
        return out
    return with_full_heads(out, q, k, v, profile, layer, start, scale, valid_len=valid_len, window=window,
                           softcap=softcap)


def _triton_kernels(q, k, v, profile, layer: int, start: int, scale: float | None, dyn, valid_len, block_sums,
                    window, softcap, full) -> tuple[torch.Tensor, bool]:
    """`(out, heads_done)`: the launches of `_triton_attention`; decode calls take the retrieval heads `full`
    into the split-K kernel (`heads_done` when `full`, `full_head_flags`' keywords, holds them), prefill chunks
    leave them to the caller."""
    from dam_kernels.decode import dam_decode
    from dam_kernels.layout import device_masks, layout_for
    from dam_kernels.prefill import dam_prefill

    B, H, Sq, D = q.shape
    G = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    masks = device_masks(profile, layer, q.device)
    dec_bn = 16 if q.device.type != "cuda" else DECODE_BLOCK_N
    blk = dyn.block if dyn is not None else 0
    ws = {name: x for name, x in (("window", window), ("softcap", softcap)) if x is not None}
    if (dyn is not None and Sq <= DECODE_MAX_ROWS and G * Sq <= 128 and start // blk == (start + Sq - 1) // blk
            and blk % dec_bn == 0 and (valid_len is None or Sq == 1)):
        # A decode step with the dynamic part: the selection of the rows' one query block goes to
        # the split-K decode kernel as extra candidate blocks (no layout is built). With
        # `valid_len` both run on the device position (graph-safe). A decode step's rows are the
        # last of the call: they get the tail budget.
        from dam_kernels.dynamic import select_blocks_one

        max_extra = max(1, dyn.last_topk) * G * (blk // dec_bn)
        # Under the graph loop the selection runs fused: by the exact-mass rule in three launches from the keys
        # (dam_kernels.select_mass), else in two from the kept block sums (dam_kernels.select).
        fused = FUSED_SELECTION and valid_len is not None and Sq == 1 and D in SELECT_HEAD_DIMS
        ext = None
        if fused and dyn.tail_mass is not None:
            from dam_kernels.select_mass import select_extra_mass

            ext = select_extra_mass(q, k, dyn, block_n=dec_bn, pcl=masks.pcl, n_keys=k.shape[2], scale=scale,
                                    valid_len=valid_len, max_extra=max_extra, window=window)
        elif fused and block_sums is not None:
            from dam_kernels.select import select_extra

            ext = select_extra(q, block_sums, dyn, block_n=dec_bn, pcl=masks.pcl, n_keys=k.shape[2],
                               valid_len=valid_len, max_extra=max_extra, window=window)
        if ext is not None:
            return dam_decode(q, k, v, masks, start=start, scale=scale, block_n=dec_bn, dyn_block=blk,
                              valid_len=valid_len, extra=ext, **full, **ws), bool(full)
        chosen = select_blocks_one(q, k, start, dyn.last_topk, blk, valid_len=valid_len, sums=block_sums,
                                   score=dyn.score, tail_mass=dyn.tail_mass, scale=scale, window=window)
        return dam_decode(q, k, v, masks, start=start, scale=scale, block_n=dec_bn, dyn=chosen,
                          dyn_block=blk, max_extra=max_extra, valid_len=valid_len, **full, **ws), bool(full)
    if dyn is not None:
        # The dynamic part: the kernel's query blocks are the selection's blocks; the selected
        # key blocks join the layout as full blocks, one batch row at a time.
        from dam_kernels import merge_lists
        from dam_kernels.dynamic import merge_layout, select_blocks

        BN = 64 if q.device.type == "cuda" and blk % 64 == 0 else 16
        lay = layout_for(profile, layer, k.shape[2], blk, BN, q.device)
        chosen = select_blocks(q, k, start, dyn.topk, blk, tail_topk=dyn.tail_topk, score=dyn.score,
                               tail_mass=dyn.tail_mass, mass=dyn.mass, scale=scale, window=window)
        # The merge runs in one Triton launch with no host sync, as the prefill kernel does (dam_kernels.merge_lists);
        # its bound is the most blocks a row of the selection holds (select_blocks keeps at most its budgets).
        most = max(dyn.topk, dyn.topk if dyn.tail_topk is None else dyn.tail_topk)
        outs = []
        for b in range(B):
            lay_b = (merge_lists.merge_layout(lay, chosen[b], blk, most) if MERGE_ONE_LAUNCH
                     else merge_layout(lay, chosen[b], blk))
            outs.append(dam_prefill(q[b : b + 1], k[b : b + 1], v[b : b + 1], masks, lay_b, start=start,
                                    scale=scale, **ws))
        return (outs[0] if B == 1 else torch.cat(outs)), False  # one row: the kernel's output, not a copy of it
    if Sq <= DECODE_MAX_ROWS and G * Sq <= 128:
        return dam_decode(q, k, v, masks, start=start, scale=scale, block_n=dec_bn, valid_len=valid_len, **full,
                          **ws), bool(full)
    BM, BN = _blocks(D, q.device)
    lay = layout_for(profile, layer, k.shape[2], BM, BN, q.device)
    return dam_prefill(q, k, v, masks, lay, start=start, scale=scale, **ws), False


def _needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def gathered_blocks(dyn_block: int | None) -> tuple[int, int]:
    """(block_m, block_n) of the CPU's gathered path: 64 x 64 (measured, docs/results/cpu-speed.md); with the
    dynamic part, query blocks inside one selection block and key blocks that tile it."""
    if dyn_block is None:
        return 64, 64
    bm = dyn_block if dyn_block <= 128 else math.gcd(dyn_block, 128)
    return bm, math.gcd(dyn_block, 64)


def prepare_gathered(profile, dyn: DynamicSelection | None, compiled: bool = True) -> None:
    """Build what the CPU's paths read of every layer ahead of their first call: the word tables
    (`device_masks`), their block summaries for the gathered path's block shape, the mask lookup table, and with
    `compiled` (backends "auto" and "compiled") the compiled kernel (built once per machine). All derive from the
    profile alone and are made once (cached while the profile lives), like loading it."""
    from dam_kernels import cpu_sparse
    from dam_kernels.block_words import block_tables
    from dam_kernels.gathered import mask_lut
    from dam_kernels.layout import device_masks

    bm, bn = gathered_blocks(dyn.block if dyn is not None else None)
    for layer in range(profile.n_layers):
        block_tables(device_masks(profile, layer, "cpu"), bm, bn)
    mask_lut()
    if compiled:
        cpu_sparse.load()  # compiled once per machine and source (under a second), then loaded from the cache


def _gathered_attention(q, k, v, profile, layer: int, start: int, scale: float | None,
                        dyn: DynamicSelection | None, window: int | None = None, softcap: float | None = None,
                        key_start: int = 0, compiled: bool = False) -> torch.Tensor:
    """The CPU's block-sparse paths: the reference's selection (one query block: `select_blocks_one`), then with
    `compiled` the compiled kernels, retrieval heads inside (`dam_kernels.cpu_sparse` for a prefill,
    `dam_kernels.cpu_decode` for rows in one query block, which chooses by exact mass from its own scores), else
    `dam_kernels.gathered`, whose retrieval heads of a longer call go to `with_full_heads`."""
    from dam_kernels import cpu_decode, cpu_sparse
    from dam_kernels.gathered import gathered_attention, one_block, one_thread_when_busy
    from dam_kernels.layout import device_masks

    name = "compiled" if compiled else "gathered"
    if q.device.type != "cpu":
        raise DamError(f"backend '{name}' runs on the CPU, got {q.device}: use backend='auto'")
    if _needs_grad(q, k, v):
        raise DamError(f"backend '{name}' computes no gradients, and q, k or v requires one: use "
                       "backend='reference', or run under torch.no_grad()")
    full_heads = getattr(profile, "full_heads", None)
    full = None if full_heads is None else full_heads[layer]
    blk, Sq = (dyn.block if dyn is not None else None), q.shape[2]
    bm, bn = gathered_blocks(blk)
    single = one_block(start, Sq, bm)
    chosen, by_mass = None, None
    built = compiled and cpu_sparse.load() is not None
    compiled_rows = built and single and cpu_decode.supports(q, k, start=start, dyn_block=blk or 0, softcap=softcap)
    compiled = built and not single and cpu_sparse.supports(q, dyn_block=blk or 0, softcap=softcap,
                                                            key_start=key_start)
    with one_thread_when_busy():
        if dyn is not None and single and dyn.tail_mass is not None:  # chosen from the attention's own scores
            by_mass = (dyn.tail_mass, dyn.last_topk)
        elif dyn is not None:
            from dam_kernels.dynamic import select_blocks, select_blocks_one

            if start // blk == (start + Sq - 1) // blk:  # a decode step: the rows' block is the call's last
                chosen = select_blocks_one(q, k, start, dyn.last_topk, blk, score=dyn.score,
                                           tail_mass=dyn.tail_mass, scale=scale, window=window)
            else:
                chosen = select_blocks(q, k, start, dyn.topk, blk, tail_topk=dyn.tail_topk, score=dyn.score,
                                       tail_mass=dyn.tail_mass, mass=dyn.mass, scale=scale, window=window)
        if compiled_rows:  # the retrieval heads computed inside, the output in q's dtype (float32)
            return cpu_decode.cpu_decode_attention(q, k, v, device_masks(profile, layer, "cpu"), start=start,
                                                   scale=scale, chosen=chosen, by_mass=by_mass, full_heads=full,
                                                   window=window, key_start=key_start)
        if compiled:  # the retrieval heads computed inside
            return cpu_sparse.cpu_sparse_attention(q, k, v, device_masks(profile, layer, "cpu"), start=start,
                                                   scale=scale, chosen=chosen, full_heads=full, window=window)
        out = gathered_attention(q, k, v, device_masks(profile, layer, "cpu"), start=start, scale=scale,
                                 chosen=chosen, dyn_block=blk or 0, window=window, softcap=softcap,
                                 key_start=key_start, full_heads=full, block_m=bm, block_n=bn, by_mass=by_mass)
    if single:  # the retrieval heads are computed
        return out
    return with_full_heads(out, q, k, v, profile, layer, start, scale, window=window, softcap=softcap,
                            key_start=key_start)


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
                     valid_len: torch.Tensor | None = None, block_sums: torch.Tensor | None = None,
                     window: int | None = None, softcap: float | None = None, key_start: int = 0) -> torch.Tensor:
    """DAM attention of query rows `start .. start+Sq-1` over keys `key_start .. start+Sq-1` of one layer.

    q `[B, H, Sq, D]`, k and v `[B, H_kv, Sk, D]` with `Sk = start + Sq - key_start`. Returns `[B, H, Sq, D]`.
    backend: "triton", "reference", "gathered", "compiled" or "auto" (Triton on CUDA where `triton_refusal` gives
    no reason, "compiled" on the CPU, the reference elsewhere). "reference" is the exact dense masked softmax;
    "gathered" (CPU only) equals it up to float rounding; "compiled" (CPU only) runs the compiled kernel for the
    prefill calls it takes (`dam_kernels.cpu_sparse.supports`, and a C compiler to build it) and "gathered" for
    the others, equal to the reference up to float rounding too. Raises `DamError` on any bad
    input before a launch.
    `dynamic` (a `DynamicSelection` with `topk` > 0; None: off) adds the dynamic part (beyond the
    paper; `dam_kernels.dynamic`): per query block of `dynamic.block` rows, the `dynamic.topk`
    earlier key blocks with the best `dynamic.score`, and `dynamic.tail_topk` of them in the
    call's last query block (where a prompt's question sits, and every decode step).
    Heads the profile keeps on full attention (the retrieval-heads option) see every causal key.

    `window` = W (a sliding-window layer): row `i` keeps key `j` only if `i - j < W` as well (the
    window AND the DAM mask). `softcap` = c: scores become `c * tanh(s / c)` before mask and softmax
    (Gemma 2). `key_start` > 0: the cache dropped the keys before it (a sliding-window cache of
    transformers); only a window that no row reaches past allows it, and only the reference runs it.

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
    _check_types(q, k, v, profile, layer, start)
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and math.isfinite(scale)):
        raise DamError(f"scale must be a finite number (None: head_dim ** -0.5), got {scale!r}")
    dyn = active_dynamic(dynamic)
    ws = dict(window=window, softcap=softcap)
    if valid_len is not None:
        if not isinstance(valid_len, torch.Tensor) or valid_len.numel() != 1 or valid_len.is_floating_point():
            raise DamError("valid_len must be a one-element integer tensor (the filled slots of a static cache)")
        if valid_len.device != q.device:
            raise DamError(f"valid_len is on {valid_len.device} but q on {q.device}: keep it on q's device")
        Sq = q.shape[2] if q.dim() == 4 else 0
        graph_safe = (backend != "reference" and q.is_cuda and Sq <= DECODE_MAX_ROWS
                      and (dyn is None or (Sq == 1 and dyn.block % DECODE_BLOCK_N == 0))
                      and triton_refusal(q, **ws) is None)
        if not graph_safe:
            if q.is_cuda and torch.cuda.is_current_stream_capturing():
                why = triton_refusal(q, **ws) or f"are not this call's path (backend {backend!r})"
                raise DamError(f"a CUDA graph cannot capture this attention call (the Triton kernels {why}; the "
                               "reference reads the cache length on the host): drop --cuda-graph")
            n = int(valid_len.reshape(()))  # host read: fine outside a graph
            if not Sq <= n <= k.shape[2]:
                raise DamError(f"valid_len {n} must cover the {Sq} query rows and fit the cache of {k.shape[2]} slots")
            return sparse_attention(q, k[:, :, :n], v[:, :, :n], profile, layer, start=n - Sq, backend=backend,
                                    scale=scale, dynamic=dyn, **ws)
        _check(q, k, v, profile, layer, k.shape[2] - q.shape[2], positions=False)  # positions live on the device
        _check_window(window, softcap, k.shape[2] - q.shape[2], 0)
        _check_triton(q, k, v, **ws)
        return _triton_attention(q, k, v, profile, layer, 0, scale, dyn, valid_len=valid_len.reshape(1),
                                 block_sums=block_sums, **ws)
    _check(q, k, v, profile, layer, start, key_start)
    _check_window(window, softcap, start, key_start)
    if dyn is not None and key_start:
        raise DamError("the dynamic part needs every key from position 0, and this cache dropped some (a "
                       "sliding-window cache): pass a cache that keeps every key (dam_cli.runtime.decode.new_cache)")
    if backend == "auto":
        # Calls the kernels do not cover (dtype, head dim, window, cut cache) fall back to the exact reference;
        # on the CPU the compiled kernel and the gathered path compute the same, block-sparse.
        if q.is_cuda and triton_refusal(q, key_start=key_start, **ws) is None:
            backend = "triton"
        else:
            backend = "compiled" if q.device.type == "cpu" and not _needs_grad(q, k, v) else "reference"
    if backend in ("gathered", "compiled"):
        return _gathered_attention(q, k, v, profile, layer, start, scale, dyn, key_start=key_start,
                                   compiled=backend == "compiled", **ws)
    if backend == "reference":
        from dam_kernels.reference import reference_attention

        rows_fn = lambda rows, n, k0=0: profile.mask_rows(layer, rows, n, k0)  # noqa: E731
        if dyn is not None:
            from dam_kernels.dynamic import dynamic_rows, select_blocks

            chosen = select_blocks(q, k, start, dyn.topk, dyn.block, tail_topk=dyn.tail_topk, score=dyn.score,
                                   tail_mass=dyn.tail_mass, mass=dyn.mass, scale=scale, window=window)
            static_fn = rows_fn
            rows_fn = lambda rows, n, k0=0: (static_fn(rows, n, k0).to(q.device)  # noqa: E731
                                            | dynamic_rows(chosen, rows, k0 + n, dyn.block)[..., k0:])
        # Static masks without retrieval heads never reach the middle of a long sequence.
        full_heads = getattr(profile, "full_heads", None)
        span = profile.pcl if dyn is None and (full_heads is None or not bool(full_heads[layer].any())) else None
        return reference_attention(q, k, v, rows_fn, start=start, scale=scale, key_span=span, key_start=key_start,
                                   **ws)
    _check_triton(q, k, v, key_start=key_start, **ws)
    return _triton_attention(q, k, v, profile, layer, start, scale, dyn, **ws)
