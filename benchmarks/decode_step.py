"""One decode step's attention, all layers, under a CUDA graph: DAM and its parts against dense.

The Llama-3.2-1B shape (16 layers, 32 query heads, 8 kv heads, head dim 64), bf16, batch 1, a static cache of
`S + 128` slots per layer (each layer its own keys and values, so no layer reads another's from L2) filled to
`S + 1`, and the recommended profile's heads tiled onto the model as `benchmarks/generate.py` tiles them (its
retrieval heads included: 32 of the 512 heads, in 8 of the 16 layers), with its run-time setting (the exact-mass
rule of a decode step). Each variant is one CUDA graph of the 16 layers' attention calls of one step, as
`dam generate --cuda-graph` replays them; the time is the median over replays (CUDA events).

Variants: `dense` (what the graph loop's dense peer runs: every slot scored, the unfilled ones masked), `dam`
(`sparse_attention` as the graph loop calls it), `dam, heads after` (the retrieval heads recomputed densely after
the kernel, `FULL_HEADS_IN_DECODE = False`), and DAM's parts alone: the selection (`select_extra_mass`), the
decode kernel with its selection given, and the dense overlay of the retrieval heads. `--sweep` also times the
launch settings those parts read from module constants (the mass rule's warps, the union's chunk, the sweep's
programs).

    python benchmarks/decode_step.py                       # 32K and 131K on the GPU
    python benchmarks/decode_step.py --lengths 4096 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from generate import build_model, environment, tiled_profile  # noqa: E402  (use_checkout runs there)

from dam_cli.artifact.profile import load_profile  # noqa: E402
from dam_cli.runtime import attention  # noqa: E402
from dam_cli.runtime import backend as dam_backend  # noqa: E402
from dam_cli.runtime.full_heads import with_full_heads  # noqa: E402

DTYPE = torch.bfloat16  # the dtype of the queries and caches
SWEEP = [False]  # --sweep: also time the selection's and the sweep's launch settings
PROFILE = os.path.join(os.path.dirname(HERE), "profiles", "smollm2-135m-instruct.safetensors")


def graph_ms(calls, replays: int = 30) -> float:
    """Median milliseconds of one replay of a CUDA graph holding `calls()` (after warm eager runs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            calls()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        calls()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times)


def step_inputs(S: int, n_layers: int, H: int, H_kv: int, D: int, dtype, device):
    """Per layer: one query row and a static cache of S + 128 slots filled to S + 1 (the slots after, NaN)."""
    g = torch.Generator(device=device).manual_seed(S)
    slots = S + 128
    layers = []
    for _ in range(n_layers):
        q = torch.randn(1, H, 1, D, device=device, dtype=dtype, generator=g)
        k = torch.randn(1, H_kv, slots, D, device=device, dtype=dtype, generator=g)
        v = torch.randn(1, H_kv, slots, D, device=device, dtype=dtype, generator=g)
        k[:, :, S + 1:] = float("nan")
        v[:, :, S + 1:] = float("nan")
        layers.append((q, k, v))
    return layers, torch.tensor([S + 1], device=device)


def measure(S: int, profile, dyn, cfg, device) -> dict:
    from dam_kernels.decode import dam_decode
    from dam_kernels.layout import device_masks
    from dam_kernels.select import union_candidates
    from dam_kernels.select_mass import block_score_stats, select_by_mass, select_extra_mass

    from dam_cli.runtime.full_heads import full_head_flags

    H, H_kv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n_layers = profile.n_layers
    layers, vl = step_inputs(S, n_layers, H, H_kv, D, DTYPE, device)
    scale = D**-0.5
    G = H // H_kv
    max_extra = max(1, dyn.last_topk) * G * (dyn.block // attention.DECODE_BLOCK_N)
    masks = [device_masks(profile, i, device) for i in range(n_layers)]
    flags = [full_head_flags(profile, i, device, H_kv) for i in range(n_layers)]

    def dense():
        for q, k, v in layers:
            dam_backend._dense_static_decode(q, k, v, vl, scale)

    def dam():
        for i, (q, k, v) in enumerate(layers):
            attention.sparse_attention(q, k, v, profile, i, backend="triton", dynamic=dyn, valid_len=vl)

    def selection():
        for i, (q, k, _) in enumerate(layers):
            select_extra_mass(q, k, dyn, block_n=attention.DECODE_BLOCK_N, pcl=masks[i].pcl, n_keys=k.shape[2],
                              scale=scale, valid_len=vl, max_extra=max_extra)

    extras = [select_extra_mass(q, k, dyn, block_n=attention.DECODE_BLOCK_N, pcl=masks[i].pcl, n_keys=k.shape[2],
                                scale=scale, valid_len=vl, max_extra=max_extra) for i, (q, k, _) in enumerate(layers)]

    def kernel(with_heads: bool):
        def run():
            for i, (q, k, v) in enumerate(layers):
                dam_decode(q, k, v, masks[i], start=0, scale=scale, block_n=attention.DECODE_BLOCK_N,
                           dyn_block=dyn.block, valid_len=vl, extra=extras[i], **(flags[i] if with_heads else {}))
        return run

    outs = [torch.empty(1, H, 1, D, device=device, dtype=DTYPE) for _ in layers]

    def overlay():
        for i, (q, k, v) in enumerate(layers):
            with_full_heads(outs[i], q, k, v, profile, i, 0, scale, valid_len=vl)

    stats = [block_score_stats(q, k, dyn.block, scale=scale, valid_len=vl) for q, k, _ in layers]
    chosen = [select_by_mass(*st, dyn.block, dyn.tail_mass, dyn.last_topk, valid_len=vl) for st in stats]

    def block_stats():
        for q, k, _ in layers:
            block_score_stats(q, k, dyn.block, scale=scale, valid_len=vl)

    def mass_rule():
        for st in stats:
            select_by_mass(*st, dyn.block, dyn.tail_mass, dyn.last_topk, valid_len=vl)

    def union():
        for i, sel in enumerate(chosen):
            union_candidates(sel, H_kv, dyn.block, block_n=attention.DECODE_BLOCK_N, pcl=masks[i].pcl,
                             n_keys=layers[i][1].shape[2], Sq=1, valid_len=vl, max_extra=max_extra)

    row = {"tokens": S, "layers with retrieval heads": sum(bool(f) for f in flags),
           "retrieval heads": int(profile.full_heads.sum()) if profile.full_heads is not None else 0}
    row["dense_ms"] = graph_ms(dense)
    row["dam_ms"] = graph_ms(dam)
    attention.FULL_HEADS_IN_DECODE = False
    try:
        row["dam_heads_after_ms"] = graph_ms(dam)
    finally:
        attention.FULL_HEADS_IN_DECODE = True
    row["selection_ms"] = graph_ms(selection)
    row["block_stats_ms"] = graph_ms(block_stats)
    row["mass_rule_ms"] = graph_ms(mass_rule)
    row["union_ms"] = graph_ms(union)
    row["kept_blocks_per_head"] = float(torch.stack([c.float().sum(-1).mean() for c in chosen]).mean())
    row["kernel_with_heads_ms"] = graph_ms(kernel(True))
    row["kernel_without_heads_ms"] = graph_ms(kernel(False))
    row["overlay_ms"] = graph_ms(overlay)
    # The in-kernel heads against the overlay, on this step's inputs (bf16 rounding apart).
    got = [attention.sparse_attention(q, k, v, profile, i, backend="triton", dynamic=dyn, valid_len=vl)
           for i, (q, k, v) in enumerate(layers)]
    attention.FULL_HEADS_IN_DECODE = False
    try:
        ref = [attention.sparse_attention(q, k, v, profile, i, backend="triton", dynamic=dyn, valid_len=vl)
               for i, (q, k, v) in enumerate(layers)]
    finally:
        attention.FULL_HEADS_IN_DECODE = True
    row["max_abs_diff_heads_inside_vs_after"] = max(float((a.float() - b.float()).abs().max())
                                                    for a, b in zip(got, ref))
    if SWEEP[0]:
        from dam_kernels import decode, select, select_mass

        knobs = ((select_mass, "MASS_RULE_WARPS", (4, 8, 16), mass_rule, "mass_rule_{}_warps"),
                 (select, "UNION_CHUNK", (64, 256, 1024), union, "union_chunk_{}"),
                 (decode, "FULL_SWEEP_PROGRAMS", (1, 2, 4, 8), kernel(True), "kernel_with_heads_sweep_{}"))
        for mod, name, values, fn, label in knobs:
            default = getattr(mod, name)
            try:
                for value in values:
                    setattr(mod, name, value)
                    row[label.format(value) + "_ms"] = graph_ms(fn)
            finally:
                setattr(mod, name, default)
    del layers
    torch.cuda.empty_cache()
    return row


def render(rows: list[dict], env: dict) -> str:
    lines = [f"{env.get('gpu')} · torch {env['torch']} · triton {env['triton']} · transformers {env['transformers']}"
             f" · CUDA {env.get('cuda')}", "",
             "| prompt tokens | dense | DAM | dense / DAM | DAM, heads after | selection (statistics / mass rule / "
             "union) | kernel (heads inside / without) | overlay of the heads |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']:,} | {r['dense_ms']:.3f} ms | {r['dam_ms']:.3f} ms | "
                     f"{r['dense_ms'] / r['dam_ms']:.2f}x | {r['dam_heads_after_ms']:.3f} ms | "
                     f"{r['selection_ms']:.3f} ms ({r['block_stats_ms']:.3f} / {r['mass_rule_ms']:.3f} / "
                     f"{r['union_ms']:.3f}) | {r['kernel_with_heads_ms']:.3f} / "
                     f"{r['kernel_without_heads_ms']:.3f} ms | "
                     f"{r['overlay_ms']:.3f} ms |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--profile", default=PROFILE)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="also time the mass rule's warps, the union's chunk and "
                    "the full heads' sweep programs")
    args = ap.parse_args()
    SWEEP[0] = args.sweep
    if not torch.cuda.is_available():
        sys.exit("decode_step.py times CUDA graphs: run it on a GPU")
    env = environment("cuda")
    print(json.dumps(env), flush=True)
    model = build_model("llama-1b", "cuda", torch.bfloat16)
    src = load_profile(args.profile)
    profile = tiled_profile(src, model)
    dyn = dam_backend.recommended_dynamic(src)
    cfg = model.config
    del model
    torch.cuda.empty_cache()
    rows = []
    os.makedirs(args.out, exist_ok=True)
    with torch.inference_mode():
        for S in [int(x) for x in args.lengths.split(",")]:
            rows.append(measure(S, profile, dyn, cfg, "cuda"))
            print(json.dumps(rows[-1]), flush=True)
            with open(os.path.join(args.out, "decode-step.json"), "w") as f:
                json.dump({"env": env, "dynamic": str(dyn), "rows": rows}, f, indent=1)
    print(render(rows, env))


if __name__ == "__main__":
    main()
