"""GPU benchmark of the DAM Triton kernels against FlexAttention (same layout) and dense SDPA.

Run on a CUDA machine:  python benchmarks/kernel_speed.py [--lengths 8192 32768 131072] [--out FILE]
Head dims 96 and 256, a sliding window and soft-capping (Phi-3, Gemma 2/3):
  python benchmarks/kernel_speed.py --shapes gemma3-270m phi3-mini --window 512 --softcap 50 --lengths 8192 32768
Prints hardware and versions, then one row per case: our time, FlexAttention's on the identical
block layout (`BlockMask.from_kv_blocks`, compiled), SDPA dense causal (cuDNN and flash), the
kept-block fraction, and our effective TFLOP/s on kept blocks; then decode against dense decode,
and the time to build DAM layouts for a 16-layer, 32-head model at 131,072 tokens. Each case also
prints the largest difference between our output and FlexAttention's (same mask, two programs).

Needs only torch, triton and numpy (plus the repository on PYTHONPATH, `kernels/` importable as
`dam_kernels`). "DAM" layouts use a real SmolLM2 profile's per-head (M, R, C) tiled over the heads
(profiles/smollm2-135m-instruct-paper.safetensors); without it a documented synthetic stand-in.
With `--window W` every layout is cut to the window (`window_layout`), our kernels and FlexAttention
(mask_mod AND `i - j < W`) get the same mask, and decode adds dense SDPA over the last W keys (plain
windowed attention); dense prefill SDPA stays causal without a window (no backend takes one).
`--softcap C` caps scores in ours and Flex (score_mod); SDPA has no soft-capping.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import triton
from dam_kernels.decode import dam_decode
from dam_kernels.layout import BlockLayout, build_layout, window_layout
from dam_kernels.prefill import dam_prefill, prefill_blocks
from dam_kernels.word_tables import DeviceMasks, kernel_tables

SMOLLM2 = os.path.join(os.path.dirname(__file__), "..", "profiles", "smollm2-135m-instruct-paper.safetensors")
SHAPES = {"llama3-8b": (32, 8, 128), "llama3.2-1b": (32, 8, 64),  # (H, H_kv, D)
          "phi3-mini": (32, 32, 96), "gemma3-270m": (4, 1, 256), "gemma2-9b": (16, 8, 256)}
DEFAULT_SHAPES = ["llama3-8b", "llama3.2-1b"]
DENSITIES = (0.5, 0.2, 0.1, 0.05)
RESULTS: list[dict] = []


def log(*a):
    print(*a, flush=True)


def bench(fn) -> float:
    """Median milliseconds of `fn` by CUDA events (triton.testing.do_bench)."""
    return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))


# ---- profiles and layouts ------------------------------------------------------------------
_PROFILE = []


def dam_source(layer: int):
    """(M [h, L, L], R [h, L], C [h, L]) bool of one layer of the real profile, or a stand-in."""
    if os.path.exists(SMOLLM2):
        from dam_cli.artifact.profile import load_profile  # numpy + torch only

        if not _PROFILE:
            _PROFILE.append(load_profile(SMOLLM2))
        p = _PROFILE[0]
        layer = min(layer, p.n_layers - 1)
        return p.layer_true_mask(layer), p.offsets[layer].clone(), p.columns[layer].clone(), f"SmolLM2 layer {layer}"
    # Stand-in with SmolLM2-like statistics: local band of offsets 0..3, a few sink columns,
    # ~2% dense true mask plus its band and sinks (documented in docs/results/kernel-speed.md).
    g = torch.Generator().manual_seed(layer)
    L, h = 512, 9
    R = torch.zeros(h, L, dtype=torch.bool)
    R[:, :4] = True
    C = torch.zeros(h, L, dtype=torch.bool)
    C[:, :4] = True
    i = torch.arange(L)
    M = (torch.rand(h, L, L, generator=g) < 0.02) | ((i[:, None] - i[None, :]) < 4) | (i[None, :] < 4)
    return M.tril(), R, C, "synthetic stand-in"


def tile_heads(M, R, C, H):
    idx = torch.arange(H) % M.shape[0]
    return M[idx].contiguous(), R[idx].contiguous(), C[idx].contiguous()


def device_masks_of(M, R, C, device) -> DeviceMasks:
    return kernel_tables(M, R, C).to(device)


def causal_masks(H, device, L=512) -> DeviceMasks:
    """A profile whose element mask is the causal rule inside any block of up to L rows."""
    M = torch.ones(H, L, L, dtype=torch.bool).tril()
    ones = torch.ones(H, L, dtype=torch.bool)
    return device_masks_of(M, ones, ones, device)


def layout_from_dense(kept: torch.Tensor, full: torch.Tensor, S, BM, BN, pad_to=None) -> BlockLayout:
    """BlockLayout from bool [H, nQ, nK] kept/full block maps (on the GPU)."""
    nK = kept.shape[-1]
    ar = torch.arange(nK, device=kept.device, dtype=torch.int32)

    def compact(flags):
        num = flags.sum(-1, dtype=torch.int32)
        key = torch.where(flags, ar, torch.iinfo(torch.int32).max)
        idx = key.sort(-1).values
        width = pad_to or max(1, int(num.max()))
        idx = idx[..., :width]
        return num.contiguous(), torch.where(idx == torch.iinfo(torch.int32).max, 0, idx).contiguous()

    pn, pi = compact(kept & ~full)
    fn, fi = compact(full)
    return BlockLayout(pn, pi, fn, fi, S, BM, BN)


def causal_block_maps(H, S, BM, BN, device):
    nQ, nK = triton.cdiv(S, BM), triton.cdiv(S, BN)
    q0 = torch.arange(nQ, device=device)[:, None] * BM
    q1 = torch.clamp(q0 + BM, max=S) - 1
    k0 = torch.arange(nK, device=device)[None, :] * BN
    kept = (k0 <= q1).expand(H, nQ, nK)
    full = (k0 + BN - 1 <= q0).expand(H, nQ, nK)
    return kept.contiguous(), full.contiguous()


def random_block_maps(H, S, BM, BN, density, device, seed=0):
    """Diagonal blocks (partial) + sink + local block + random others, ~`density` of causal blocks."""
    kept, full = causal_block_maps(H, S, BM, BN, device)
    diag = kept & ~full
    nQ, nK = kept.shape[1:]
    kb = torch.arange(nK, device=device)
    qb_last_full = (torch.arange(nQ, device=device) * BM - BN + 1) // BN  # last full block per qb
    forced = full & ((kb[None, None, :] == 0) | (kb[None, None, :] == qb_last_full[None, :, None]))
    others = full & ~forced
    n_causal = int(kept.sum())
    need = density * n_causal - int(diag.sum()) - int(forced.sum())
    p = max(0.0, min(1.0, need / max(1, int(others.sum()))))
    g = torch.Generator(device=device).manual_seed(seed)
    pick = others & (torch.rand(others.shape, device=device, generator=g) < p)
    full_kept = forced | pick
    return diag | full_kept, full_kept


def split_layout(lay: BlockLayout, factor: int) -> BlockLayout:
    """The same kept cells with key blocks `factor` times narrower (for a narrower kernel tile)."""
    if factor == 1:
        return lay

    def split(num, idx):
        f = torch.arange(factor, device=idx.device, dtype=idx.dtype)
        new = (idx[..., :, None] * factor + f).flatten(-2)
        return (num * factor).contiguous(), new.contiguous()

    pn, pi = split(lay.kv_num_blocks, lay.kv_indices)
    fn, fi = split(lay.full_kv_num_blocks, lay.full_kv_indices)
    return BlockLayout(pn, pi, fn, fi, lay.length, lay.block_m, lay.block_n // factor, lay.partial_share,
                       lay.window)


def split_rows(lay: BlockLayout, factor: int) -> BlockLayout:
    """The same kept cells with query blocks `factor` times shorter (head dim 256 runs 64-row tiles):
    each part keeps its block's lists (exact: a full block's parts are full, the kernel masks partial ones)."""
    if factor == 1:
        return lay
    rep = lambda t: t.repeat_interleave(factor, dim=1).contiguous()  # noqa: E731
    return BlockLayout(rep(lay.kv_num_blocks), rep(lay.kv_indices), rep(lay.full_kv_num_blocks),
                       rep(lay.full_kv_indices), lay.length, lay.block_m // factor, lay.block_n,
                       lay.partial_share, lay.window)


def our_layout(lay: BlockLayout, tile_bn: int, D: int) -> BlockLayout:
    """`lay` (Flex's 128x128 blocks) in our kernel's tile for head dim D (`prefill_blocks`)."""
    return split_rows(split_layout(lay, lay.block_n // tile_bn), lay.block_m // min(lay.block_m, prefill_blocks(D)[0]))


def windowed(lay: BlockLayout, window: int | None) -> BlockLayout:
    return lay if window is None else window_layout(lay, window)


# ---- peers ---------------------------------------------------------------------------------
_FLEX = None


def flex_fn():
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.cache_size_limit = 256
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = 4096
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def dam_mask_mod(Mt, Rt, Ct, L):
    """The Stage-2 element mask as a FlexAttention mask_mod over the profile's tensors."""

    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        inside = (q_idx < L) & (kv_idx < L)
        mbit = Mt[h, q_idx.clamp(max=L - 1), kv_idx.clamp(max=L - 1)]
        rbit = Rt[h, d.clamp(0, L - 1)] & (d < L)
        cbit = Ct[h, kv_idx.clamp(max=L - 1)] & (kv_idx < L)
        return (torch.where(inside, mbit, rbit | cbit) & (d >= 0)) | (d == 0)

    return mask_mod


def with_window(mask_mod, window):
    """mask_mod AND the sliding window `q_idx - kv_idx < window` (unchanged when None)."""
    if window is None:
        return mask_mod
    return lambda b, h, q_idx, kv_idx: mask_mod(b, h, q_idx, kv_idx) & (q_idx - kv_idx < window)


def softcap_mod(softcap):
    """FlexAttention score_mod of Gemma 2's soft-capping (None: no score_mod)."""
    if softcap is None:
        return None
    return lambda score, b, h, q_idx, kv_idx: softcap * torch.tanh(score / softcap)


def flex_block_mask(lay: BlockLayout, mask_mod):
    from torch.nn.attention.flex_attention import BlockMask

    nK = lay.n_kv_blocks

    def pad(idx):
        return torch.nn.functional.pad(idx, (0, nK - idx.shape[-1])) if idx.shape[-1] < nK else idx[..., :nK]

    return BlockMask.from_kv_blocks(
        lay.kv_num_blocks[None], pad(lay.kv_indices)[None].contiguous(),
        lay.full_kv_num_blocks[None], pad(lay.full_kv_indices)[None].contiguous(),
        BLOCK_SIZE=(lay.block_m, lay.block_n), mask_mod=mask_mod, seq_lengths=(lay.length, lay.length))


def sdpa_dense(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run():
        with sdpa_kernel([be]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    try:
        run()
        return run
    except Exception:  # some backends take no enable_gqa: hand them expanded heads (untimed copy)
        G = q.shape[1] // k.shape[1]
        ke, ve = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)

        def run_expanded():
            with sdpa_kernel([be]):
                return torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)

        run_expanded()
        return run_expanded


# ---- cases ---------------------------------------------------------------------------------
def prefill_case(name, shape, S, lay, masks, mask_mod, q, k, v, dense_ms, tile_bn, cfg):
    """cfg: dam_prefill's keywords (`window`, `softcap` also shape Flex's mask_mod and score_mod)."""
    H, H_kv, D = SHAPES[shape]
    window, softcap = cfg.get("window"), cfg.get("softcap")
    lay = windowed(lay, window)
    mask_mod = with_window(mask_mod, window)
    row = {"kind": "prefill", "case": name, "shape": shape, "S": S, "kept": lay.kept_fraction(),
           "block": f"{lay.block_m}x{lay.block_n}", "window": window, "softcap": softcap}
    ours_lay = our_layout(lay, tile_bn, D)
    ours = lambda: dam_prefill(q, k, v, masks, ours_lay, start=0, scale=D**-0.5, **cfg)  # noqa: E731
    out = ours()
    torch.cuda.synchronize()
    row["ours_ms"] = bench(ours)
    flops = 4.0 * lay.kept_blocks() * lay.block_m * lay.block_n * D
    row["ours_tflops"] = flops / row["ours_ms"] / 1e9
    try:
        bm = flex_block_mask(lay, mask_mod)
        flex = flex_fn()
        t0 = time.perf_counter()
        smod = softcap_mod(softcap)
        ref = flex(q, k, v, score_mod=smod, block_mask=bm, enable_gqa=True)
        torch.cuda.synchronize()
        row["flex_first_call_s"] = time.perf_counter() - t0
        row["flex_ms"] = bench(lambda: flex(q, k, v, score_mod=smod, block_mask=bm, enable_gqa=True))
        row["max_diff_vs_flex"] = (out.float() - ref.float()).abs().max().item()
        row["ratio_vs_flex"] = row["ours_ms"] / row["flex_ms"]
        del bm, ref
    except Exception as e:  # noqa: BLE001
        row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    row.update({f"sdpa_{k_}_ms": v_ for k_, v_ in dense_ms.items()})
    if "sdpa_cudnn_ms" in row:
        row["ratio_vs_cudnn"] = row["ours_ms"] / row["sdpa_cudnn_ms"]
    RESULTS.append(row)
    log(json.dumps(row))
    return row


def run_prefill(shape, S, args, device):
    H, H_kv, D = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(S + D)
    q = torch.randn(1, H, S, D, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, H_kv, S, D, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, H_kv, S, D, device=device, dtype=torch.bfloat16, generator=g)
    dense = {}
    for be in ("cudnn", "flash"):
        try:
            dense[be] = bench(sdpa_dense(q, k, v, be))
        except Exception as e:  # noqa: BLE001
            log(f"sdpa {be} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    flops_causal = 4.0 * H * D * S * (S + 1) / 2
    log(f"# {shape} S={S}: SDPA " + ", ".join(f"{k_} {v_:.3f} ms ({flops_causal / v_ / 1e9:.0f} TFLOP/s)"
                                             for k_, v_ in dense.items()))
    BM, BLK = 128, 128  # layouts in 128x128 blocks: FlexAttention's default tile divides them
    # Our key tile on the 128x128 layouts: 128 keys at D=64, 64 at D=128 (the 8K/32K sweep's best).
    tile_bn = args.tile_bn or (128 if D == 64 else 64)
    cfg = {key: val for key, val in (("window", args.window), ("softcap", args.softcap)) if val is not None}
    cmasks = causal_masks(H, device)
    Lc = cmasks.pcl
    Mt = torch.ones(H, Lc, Lc, dtype=torch.bool, device=device).tril()
    ones = torch.ones(H, Lc, dtype=torch.bool, device=device)
    causal_mod = dam_mask_mod(Mt, ones, ones, Lc)
    kept, full = causal_block_maps(H, S, BM, BLK, device)
    prefill_case("all-causal", shape, S, layout_from_dense(kept, full, S, BM, BLK), cmasks, causal_mod,
                 q, k, v, dense, tile_bn, cfg)
    for dens in DENSITIES:
        kept, full = random_block_maps(H, S, BM, BLK, dens, device, seed=int(dens * 100))
        prefill_case(f"random {int(dens * 100)}%", shape, S, layout_from_dense(kept, full, S, BM, BLK), cmasks,
                     causal_mod, q, k, v, dense, tile_bn, cfg)
        del kept, full
    for layer in args.dam_layers:
        M, R, C, src = dam_source(layer)
        M, R, C = tile_heads(M, R, C, H)
        dm = device_masks_of(M, R, C, device)
        mod = dam_mask_mod(M.to(device), R.to(device), C.to(device), M.shape[-1])
        lay = build_layout(M, R, C, S, BM, BLK).to(device)
        prefill_case(f"DAM {src}", shape, S, lay, dm, mod, q, k, v, dense, tile_bn, cfg)
        # Our kernel on the finer layout its tile allows (not comparable with Flex's blocks).
        fm, fn_ = prefill_blocks(D)
        fine = windowed(build_layout(M, R, C, S, fm, fn_), args.window).to(device)  # what sparse_attention builds
        row = {"kind": "prefill", "case": f"DAM {src} (ours, {fm}x{fn_} layout)", "shape": shape, "S": S,
               "kept": fine.kept_fraction(), "block": f"{fm}x{fn_}", "window": args.window, "softcap": args.softcap}
        row["ours_ms"] = bench(lambda: dam_prefill(q, k, v, dm, fine, start=0, scale=D**-0.5, **cfg))
        RESULTS.append(row)
        log(json.dumps(row))
    del q, k, v
    torch.cuda.empty_cache()


def run_decode(shape, Sk, args, device):
    H, H_kv, D = SHAPES[shape]
    G = H // H_kv
    g = torch.Generator(device=device).manual_seed(Sk)
    q = torch.randn(1, H, 1, D, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, H_kv, Sk, D, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, H_kv, Sk, D, device=device, dtype=torch.bfloat16, generator=g)
    M, R, C, src = dam_source(args.dam_layers[0])
    M, R, C = tile_heads(M, R, C, H)
    dm = device_masks_of(M, R, C, device)
    W, cap = args.window, args.softcap
    ours = lambda: dam_decode(q, k, v, dm, start=Sk - 1, scale=D**-0.5, window=W, softcap=cap)  # noqa: E731
    out = ours()
    # Dense decode variants; the best is the peer. Grouped: the G query heads of a kv head as rows.
    qg = q.view(1, H_kv, G, D)
    variants = {
        "sdpa_gqa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "sdpa_grouped_rows": lambda: torch.nn.functional.scaled_dot_product_attention(qg, k, v),
    }
    if W is not None:  # plain windowed attention: the last W keys only
        kw, vw = k[:, :, -W:], v[:, :, -W:]
        variants["sdpa_window_slice"] = lambda: torch.nn.functional.scaled_dot_product_attention(qg, kw, vw)
    row = {"kind": "decode", "case": f"DAM {src}", "shape": shape, "Sk": Sk, "window": W, "softcap": cap}
    best = None
    for name, fn in variants.items():
        try:
            fn()
            row[f"dense_{name}_ms"] = bench(fn)
            row[f"dense_{name}_graph_ms"] = float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
            best = min(best or 1e9, row[f"dense_{name}_graph_ms"], row[f"dense_{name}_ms"])
        except Exception as e:  # noqa: BLE001
            row[f"dense_{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    row["ours_ms"] = bench(ours)
    row["ours_graph_ms"] = float(triton.testing.do_bench_cudagraph(ours, rep=100, return_mode="median"))
    row["dense_best_ms"] = best
    row["speedup_vs_dense"] = best / row["ours_graph_ms"] if best else None
    # Correctness against a dense masked softmax of the same rows (float32, on the GPU).
    allowed = stage2_row(M, R, C, Sk - 1, Sk).to(device)  # [H, Sk]
    if W is not None:
        allowed &= torch.arange(Sk, device=device) > Sk - 1 - W
    kf = k.float().repeat_interleave(G, 1)[0]
    vf = v.float().repeat_interleave(G, 1)[0]
    s = torch.einsum("hd,hkd->hk", q.float()[0, :, 0], kf) * D**-0.5
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    ref = torch.einsum("hk,hkd->hd", ref, vf)
    row["max_diff_vs_fp32"] = (out.float()[0, :, 0] - ref).abs().max().item()
    RESULTS.append(row)
    log(json.dumps(row))


def stage2_row(M, R, C, t, n_keys):
    from dam_kernels.stage2 import stage2_rows

    return stage2_rows(M, R, C, torch.tensor([t]), n_keys)[:, 0]


def run_layout_timing(S=131072, n_layers=16, H=32, BM=128, BN=64):
    """Time to build DAM layouts for every layer of a 16-layer, 32-head model at S tokens."""
    srcs = [tile_heads(*dam_source(layer)[:3], H) for layer in range(n_layers)]
    t0 = time.perf_counter()
    for i, (M, R, C) in enumerate(srcs):
        build_layout(M, R, C, S, BM, BN, cache_key=("bench", i, BM, BN))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, (M, R, C) in enumerate(srcs):
        build_layout(M, R, C, S - 1, BM, BN, cache_key=("bench", i, BM, BN))
    again = time.perf_counter() - t0
    row = {"kind": "layout", "S": S, "layers": n_layers, "heads": H, "block": f"{BM}x{BN}",
           "first_s": first, "new_length_s": again, "cpu_threads": torch.get_num_threads()}
    RESULTS.append(row)
    log(json.dumps(row))


SWEEP_TILES = [(128, 64), (128, 128), (64, 64), (64, 128)]


def run_sweep(device, lengths=(8192, 32768), shapes=DEFAULT_SHAPES, tiles=None, stages_list=(2, 3, 4),
              density=None):
    """Tiles x warps x stages (TMA loads where the head dim allows) of our kernel on the all-causal
    layout (or, with `density`, `random_block_maps`' layout of that share of the causal 128 x 128 blocks), per
    head dim."""
    for S in lengths:
        for shape in shapes:
            H, H_kv, D = SHAPES[shape]
            q = torch.randn(1, H, S, D, device=device, dtype=torch.bfloat16)
            k = torch.randn(1, H_kv, S, D, device=device, dtype=torch.bfloat16)
            v = torch.randn(1, H_kv, S, D, device=device, dtype=torch.bfloat16)
            cudnn = bench(sdpa_dense(q, k, v, "cudnn"))
            cm = causal_masks(H, device)
            # TFLOP/s as in the prefill tables: 4 x 128 x 128 x D per kept 128x128 block, whatever the tile.
            kept128, full128 = causal_block_maps(H, S, 128, 128, device)
            flops = 4.0 * layout_from_dense(kept128, full128, S, 128, 128).kept_blocks() * 128 * 128 * D
            del kept128, full128
            if density is not None:  # the random layout in 128 x 128 blocks, then split to each tile
                kept128, full128 = random_block_maps(H, S, 128, 128, density, device, seed=int(density * 100))
                flops = 4.0 * layout_from_dense(kept128, full128, S, 128, 128).kept_blocks() * 128 * 128 * D
            for BM, BN in tiles or SWEEP_TILES:
                if density is not None:
                    lay = split_layout(split_rows(layout_from_dense(kept128, full128, S, 128, 128), 128 // BM),
                                       128 // BN)
                    row_case = f"random {int(density * 100)}%"
                else:
                    row_case = "all-causal"
                    kept, full = causal_block_maps(H, S, BM, 128, device)
                    lay = split_layout(layout_from_dense(kept, full, S, BM, 128), 128 // BN)
                    del kept, full
                for warps in (4, 8):
                    for stages in stages_list:
                        tma = D == triton.next_power_of_2(D)
                        row = {"kind": "sweep", "case": row_case, "shape": shape, "S": S, "tile": f"{BM}x{BN}",
                               "tma": tma, "warps": warps, "stages": stages}
                        try:
                            ms = bench(lambda: dam_prefill(q, k, v, cm, lay, start=0, scale=D**-0.5,
                                                           num_warps=warps, num_stages=stages, use_tma=tma))
                            tf = flops / ms / 1e9
                            row.update(ms=ms, tflops=tf, cudnn_ms=cudnn, ratio_vs_cudnn=ms / cudnn)
                        except Exception as e:  # noqa: BLE001
                            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                        RESULTS.append(row)
                        log(json.dumps(row))
            del q, k, v
            torch.cuda.empty_cache()


def summary():
    log("\n## Prefill (bf16, batch 1, ms; ratio = ours / peer)")
    log("(window / softcap, when set, apply to ours and Flex; cuDNN and flash are dense causal)")
    log("| shape | tokens | case | kept | ours | TFLOP/s | Flex | ours/Flex | cuDNN | flash | ours/cuDNN "
        "| max|ours-Flex| |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in RESULTS:
        if r["kind"] != "prefill":
            continue
        f = lambda key, fmt="{:.3f}": fmt.format(r[key]) if r.get(key) is not None else "-"  # noqa: E731
        log(f"| {r['shape']} | {r['S']} | {r['case']} | {r['kept']:.4f} | {f('ours_ms')} | "
            f"{f('ours_tflops', '{:.0f}')} | "
            f"{f('flex_ms')} | {f('ratio_vs_flex', '{:.2f}')} | {f('sdpa_cudnn_ms')} | {f('sdpa_flash_ms')} | "
            f"{f('ratio_vs_cudnn', '{:.2f}')} | {f('max_diff_vs_flex', '{:.2g}')} |")
    log("\n## Decode (1 query row, bf16, ms)")
    log("(dense best includes SDPA over the last W keys when a window is set)")
    log("| shape | cached tokens | ours (graph) | ours (launch) | dense best | speed-up | max diff vs fp32 |")
    log("|---|---|---|---|---|---|---|")
    for r in RESULTS:
        if r["kind"] == "decode":
            log(f"| {r['shape']} | {r['Sk']} | {r['ours_graph_ms']:.4f} | {r['ours_ms']:.4f} | "
                f"{(r['dense_best_ms'] or float('nan')):.4f} | {(r['speedup_vs_dense'] or float('nan')):.1f}x | "
                f"{r['max_diff_vs_fp32']:.2g} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(SHAPES),
                    help="(H, H_kv, D) presets; phi3-mini has D=96, gemma3-270m and gemma2-9b D=256")
    ap.add_argument("--window", type=int, default=None, help="sliding window W: keys with i - j < W only")
    ap.add_argument("--softcap", type=float, default=None, help="logit soft-capping c (Gemma 2: 50)")
    ap.add_argument("--decode-lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--dam-layers", type=int, nargs="+", default=[15, 1])
    ap.add_argument("--tile-bn", type=int, default=None, help="our kernel's key tile (16, 32, 64 or 128; default 64)")
    ap.add_argument("--sweep", action="store_true", help="also sweep tiles/warps/stages at 8K and 32K")
    ap.add_argument("--only-sweep", action="store_true", help="the sweep alone (no layout timing, decode, prefill)")
    ap.add_argument("--sweep-tiles", default=None, help="the sweep's tiles, e.g. 64x64,64x32,128x32 (default: all)")
    ap.add_argument("--sweep-stages", default="2,3,4", help="the sweep's pipeline stages, comma-separated")
    ap.add_argument("--sweep-lengths", default="8192,32768", help="the sweep's lengths, comma-separated")
    ap.add_argument("--sweep-density", type=float, default=None,
                    help="sweep on a random layout of this share of the causal blocks (default: all-causal)")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_speed.py needs a CUDA GPU")
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    log(f"# {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}, Python {platform.python_version()}")
    log(f"# DAM source: {dam_source(args.dam_layers[0])[3]}")
    sweep_kw = dict(lengths=[int(x) for x in args.sweep_lengths.split(",")], shapes=args.shapes,
                    tiles=[tuple(int(x) for x in t.split("x")) for t in args.sweep_tiles.split(",")]
                    if args.sweep_tiles else None,
                    stages_list=[int(x) for x in args.sweep_stages.split(",")], density=args.sweep_density)
    if args.only_sweep:
        run_sweep(device, **sweep_kw)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(RESULTS, f, indent=1)
        return
    run_layout_timing()
    for shape in args.shapes:
        for Sk in args.decode_lengths:
            run_decode(shape, Sk, args, device)
    if args.sweep:
        run_sweep(device, **sweep_kw)
    if not args.skip_prefill:
        for S in args.lengths:
            for shape in args.shapes:
                run_prefill(shape, S, args, device)
                if args.out:  # keep what has been measured, should a later case run out of time
                    with open(args.out, "w") as f:
                        json.dump(RESULTS, f, indent=1)
    summary()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
