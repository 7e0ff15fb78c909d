"""The antidiagonal estimate's cost on a GPU, beside dense attention of the same layer (the peer it must stay far
below), for several launch settings of `dam_kernels.antidiag` and the selection rule after it.

For each shape and length: dense causal SDPA of the layer (cuDNN / flash, whichever torch picks), the sampled
estimate at its default tiles and at each setting of `TILES`, `cumulative_select` on its output (the rule
`antidiag_select` applies), and XAttention's summed-antidiagonal estimate (`dam_kernels.antisum`) at its default
and at each setting of `ANTISUM_TILES` that applies to the head dim. Each setting with its largest difference from
its default's result; a setting the device cannot take is listed with its error. Medians of
`triton.testing.do_bench`, in ms, and each as a share of dense. Needs CUDA.

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
ANTISUM_TILES = [  # row groups, key groups, warps, stages, whether the row groups are loaded once, chunk (bk)
    (64, 64, 4, 2, True, 0), (64, 64, 8, 2, True, 0), (64, 64, 4, 3, True, 0), (64, 128, 8, 2, True, 0),
    (32, 64, 4, 2, True, 0), (32, 128, 4, 3, True, 0), (64, 64, 4, 2, False, 0), (64, 128, 8, 3, False, 0),
    (128, 64, 8, 2, False, 0), (128, 128, 8, 2, False, 0), (32, 64, 4, 2, False, 0), (32, 128, 8, 2, False, 0),
    (16, 64, 4, 2, False, 0),
    (128, 128, 8, 3, False, 64), (128, 128, 8, 4, False, 64), (128, 64, 8, 3, False, 64), (128, 64, 4, 3, False, 64),
    (64, 128, 4, 3, False, 64), (64, 128, 8, 4, False, 64), (64, 64, 4, 4, False, 64), (128, 128, 8, 4, False, 32),
    (128, 128, 8, 2, False, 128), (256, 64, 8, 3, False, 64), (128, 256, 8, 3, False, 64), (64, 256, 4, 3, False, 64),
    (256, 128, 8, 3, False, 64), (128, 128, 8, 5, False, 32), (128, 128, 4, 3, False, 64), (128, 128, 8, 5, False, 64),
    (128, 128, 8, 4, False, 64, True), (128, 128, 8, 3, False, 64, True), (128, 128, 8, 4, False, 32, True),
    (128, 256, 8, 3, False, 64, True), (64, 128, 4, 4, False, 64, True),
]
ANTISUM_KEYS = ("bm", "bn", "warps", "stages", "grouped", "bk", "flat")  # flat: one loop over key tiles and chunks


def summed_settings(head_dim: int, stride: int) -> list[dict]:
    """The `ANTISUM_TILES` that apply at this head dim: a chunk that divides it; row groups loaded once only where
    they fit; whole row offsets of head dims above 128 only in tiles of at most 64 row groups (larger ones exceed
    an H100's shared memory)."""
    from dam_kernels import antisum

    out = []
    for x in ANTISUM_TILES:
        t = dict(zip(ANTISUM_KEYS, x))
        if t["bk"] and (t["grouped"] or head_dim % t["bk"]):
            continue
        if t["grouped"] and not antisum.grouped(t["bm"], stride, head_dim):
            continue
        if not t["bk"] and head_dim > 128 and t["bm"] > 64:
            continue
        out.append(t)
    return out


def sweep(run, settings: list[dict], do_bench) -> tuple[dict, list[dict]]:
    """`run(tiles)` at its default (`tiles=None`) and at each of `settings`: ms, and each setting's largest difference
    from the default's result; a setting the device cannot take (shared memory, registers) is listed with its
    error, and so is the default."""
    def timed(t):
        try:
            got = run(t)  # also compiles it before it is timed
            return got, {"ms": do_bench(lambda: run(t))}
        except Exception as e:  # noqa: BLE001 - reported in the table, the sweep goes on
            return None, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}

    want, default = timed(None)
    out = []
    for t in settings:
        got, res = timed(t)
        if got is not None and want is not None:
            res["max_diff_vs_default"] = float((got - want).abs().max())
        out.append({**t, **res})
    return default, out


def _path(t: dict) -> str:
    """How a summed setting takes its products: row groups loaded once, a row offset a step, or `bk` dims a step."""
    path = "once" if t["grouped"] else f"bk{t['bk']}" if t.get("bk") else "rows"
    return path + ("/flat" if t.get("flat") else "")


def _cell(t: dict, dense: float) -> str:
    return f"{t['ms']:.2f} ms ({t['ms'] / dense:.2f}x dense)" if "ms" in t else t["error"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--shapes", default="llama-1b,gemma3-270m")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--stride", type=int, default=16, help="the sampled estimate's stride")
    ap.add_argument("--antisum-stride", type=int, default=8, help="the summed estimate's group size (shipped: 8)")
    ap.add_argument("--variants", default="row_step=2,row_step=4,row_step=8,stride=16",
                    help="the summed estimate at its default tiles with these changes (row_step: one row group in "
                         "that many estimated; stride: the group size; one_pass=0: the products taken twice, as "
                         "before dam_kernels.antisum_partials), comma-separated")
    ap.add_argument("--no-sweep", action="store_true", help="time only the default tiles of each estimate")
    ap.add_argument("--only-summed", action="store_true", help="skip the sampled estimate (stride --stride)")
    ap.add_argument("--row-step", type=int, default=1, help="the summed estimate's row sampling in its tile sweep")
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
            sampled, tiles = ({"ms": float("nan")}, []) if args.only_summed else sweep(
                lambda t: antidiag.antidiag_block_mass(q, k, 0, args.block, args.stride, tiles=t),
                [] if args.no_sweep else [dict(zip(("bm", "bn", "warps", "stages"), x))
                                          for x in TILES if D <= 128 or x[0] <= 64], do_bench)
            summed, summed_tiles = sweep(
                lambda t: antisum.antisum_block_mass(q, k, 0, args.block, args.antisum_stride, tiles=t,
                                                     row_step=args.row_step),
                [] if args.no_sweep else summed_settings(D, args.antisum_stride), do_bench)
            variants = {}
            for spec in [v for v in args.variants.split(",") if v]:
                key, value = spec.split("=")
                kw = {"stride": args.antisum_stride, "row_step": 1, key: int(value)}
                variants[spec], _ = sweep(
                    lambda t, kw=kw: antisum.antisum_block_mass(q, k, 0, args.block, tiles=t, **kw), [], do_bench)
            mass = antidiag.antidiag_block_mass(q, k, 0, args.block, args.stride)
            sel = do_bench(lambda: cumulative_select(mass, 0.9, 32))
            rows.append({"shape": shape, "tokens": S, "dense_ms": dense, "select_ms": sel, "antidiag": sampled,
                         "tiles": tiles, "antisum": summed, "antisum_tiles": summed_tiles,
                         "antisum_variants": variants})
            print(f"{shape} {S:,} tokens: dense {dense:.2f} ms, selection rule {sel:.2f} ms; sampled estimate "
                  f"(stride {args.stride}) {_cell(sampled, dense)}, by tiles: "
                  + ", ".join(f"{t['bm']}x{t['bn']}/{t['warps']}w/{t['stages']}s {_cell(t, dense)}" for t in tiles),
                  flush=True)
            print(f"  summed estimate (stride {args.antisum_stride}, row step {args.row_step}) {_cell(summed, dense)}, "
                  "by tiles: "
                  + ", ".join(f"{t['bm']}x{t['bn']}/{t['warps']}w/{t['stages']}s/{_path(t)} "
                              f"{_cell(t, dense)}" for t in summed_tiles), flush=True)
            print("  summed estimate variants: " + ", ".join(f"{k} {_cell(v, dense)}" for k, v in variants.items()),
                  flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench-antidiag.json"), "w") as f:
        json.dump({"env": env, "block": args.block, "stride": args.stride, "antisum_stride": args.antisum_stride,
                   "row_step": args.row_step, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
