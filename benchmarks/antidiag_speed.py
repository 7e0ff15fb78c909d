"""The antidiagonal estimate's cost on a GPU, beside dense attention of the same layer (the peer it must stay far
below), for several launch settings of `dam_kernels.antidiag` and the selection rule after it.

For each shape and length: dense causal SDPA of the layer (cuDNN / flash, whichever torch picks), the estimate
with each tile setting (checked equal to the default setting's result), `cumulative_select` on its output
(the sort-based rule `antidiag_select` applies), and XAttention's summed-antidiagonal estimate (`dam_kernels.antisum`,
its default tiles, then each setting of `ANTISUM_TILES`). Medians of `triton.testing.do_bench`, in ms, and each
as a share of dense. Needs CUDA.

    python benchmarks/antidiag_speed.py --lengths 32768,131072 --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

SHAPES = {  # name: (query heads, kv heads, head dim)
    "llama-1b": (32, 8, 64),
    "gemma3-270m": (4, 1, 256),
}
TILES = [  # sampled rows, sampled keys, warps, stages
    (64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2), (64, 256, 8, 2),
    (128, 64, 8, 3),
]
ANTISUM_TILES = [  # row groups, key groups, warps, stages, whether the row groups are loaded once
    (64, 64, 4, 2, True), (64, 64, 8, 2, True), (64, 64, 4, 3, True), (64, 128, 8, 2, True), (32, 64, 4, 2, True),
    (32, 128, 4, 3, True), (64, 64, 4, 2, False), (64, 128, 8, 3, False), (128, 64, 8, 2, False),
    (128, 128, 8, 2, False), (32, 64, 4, 2, False), (32, 128, 8, 2, False), (16, 64, 4, 2, False),
]


def antisum_sweep(q, k, block: int, stride: int, do_bench) -> list[dict]:
    """`dam_kernels.antisum` at each setting of `ANTISUM_TILES` that applies to this head dim: ms, and the largest
    difference from the default setting's estimate."""
    from dam_kernels import antisum

    want = antisum.antisum_block_mass(q, k, 0, block, stride)
    out = []
    for bm, bn, warps, stages, once in ANTISUM_TILES:
        bm_used = bm if q.shape[-1] <= 128 else min(bm, 32)
        if bm_used != bm or (once and not antisum.grouped(bm, stride, q.shape[-1])):
            continue
        t = {"bm": bm, "bn": bn, "warps": warps, "stages": stages, "grouped": once}
        try:
            got = antisum.antisum_block_mass(q, k, 0, block, stride, tiles=t)
            diff = float((got - want).abs().max())
            ms = do_bench(lambda t=t: antisum.antisum_block_mass(q, k, 0, block, stride, tiles=t))
        except Exception as e:  # a setting the device cannot take (shared memory, registers): say so, go on
            out.append({**t, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            continue
        out.append({**t, "ms": ms, "max_diff_vs_default": diff})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--shapes", default="llama-1b,gemma3-270m")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--stride", type=int, default=16, help="the sampled estimate's stride")
    ap.add_argument("--antisum-stride", type=int, default=8, help="the summed estimate's group size (shipped: 8)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/antidiag_speed.py needs a CUDA GPU")
    import triton
    from dam_kernels import antidiag, antisum
    from dam_kernels.block_mass import cumulative_select
    from triton.testing import do_bench

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version()}
    print(json.dumps(env), flush=True)
    rows = []
    for shape in args.shapes.split(","):
        H, H_kv, D = SHAPES[shape]
        for S in (int(x) for x in args.lengths.split(",")):
            g = torch.Generator(device="cuda").manual_seed(S)
            q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, H_kv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn_like(k)
            dense = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True))
            want = antidiag.antidiag_block_mass(q, k, 0, args.block, args.stride)
            sel = do_bench(lambda: cumulative_select(want, 0.9, 32))
            antisum.antisum_block_mass(q, k, 0, args.block, args.antisum_stride)  # compiled before it is timed
            summed = do_bench(lambda: antisum.antisum_block_mass(q, k, 0, args.block, args.antisum_stride))
            row = {"shape": shape, "tokens": S, "dense_ms": dense, "select_ms": sel, "antisum_ms": summed, "tiles": [],
                   "antisum_tiles": antisum_sweep(q, k, args.block, args.antisum_stride, do_bench)}
            for bm, bn, warps, stages in TILES:
                if D > 128 and bm > 64:
                    continue
                t = {"bm": bm, "bn": bn, "warps": warps, "stages": stages}
                try:
                    got = antidiag.antidiag_block_mass(q, k, 0, args.block, args.stride, tiles=t)
                    diff = float((got - want).abs().max())
                    ms = do_bench(lambda t=t: antidiag.antidiag_block_mass(q, k, 0, args.block, args.stride, tiles=t))
                except Exception as e:  # a setting the device cannot take (shared memory): say so, go on
                    row["tiles"].append({**t, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                    continue
                row["tiles"].append({**t, "ms": ms, "max_diff_vs_default": diff})
            rows.append(row)
            best = min((t for t in row["tiles"] if "ms" in t), key=lambda t: t["ms"])
            print(f"{shape} {S:,} tokens: dense {dense:.2f} ms, selection rule {sel:.2f} ms; estimate: "
                  + ", ".join(f"{t['bm']}x{t['bn']}/{t['warps']}w/{t['stages']}s "
                              + (f"{t['ms']:.2f} ms ({t['ms'] / dense:.2f}x dense)" if "ms" in t else t["error"])
                              for t in row["tiles"])
                  + f"; best {best['bm']}x{best['bn']}/{best['warps']}w/{best['stages']}s"
                  + f"; summed-antidiagonal estimate {summed:.2f} ms ({summed / dense:.2f}x dense)", flush=True)
            print(f"  summed estimate by tiles (stride {args.antisum_stride}): "
                  + ", ".join(f"{t['bm']}x{t['bn']}/{t['warps']}w/{t['stages']}s/{'once' if t['grouped'] else 'rows'} "
                              + (f"{t['ms']:.2f} ms ({t['ms'] / dense:.2f}x dense)" if "ms" in t else t["error"])
                              for t in row["antisum_tiles"]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench-antidiag.json"), "w") as f:
        json.dump({"env": env, "block": args.block, "stride": args.stride, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
