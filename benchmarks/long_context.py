"""A real model at long context: end-to-end time and the global layers' attention alone, DAM against dense.

For a model with sliding-window layers (Gemma 3: five windowed layers to one global), most of the
attention is already cheap; DAM's promise at long context lies in the global layers. This harness
measures both, in one run, on real text (a RULER-style prompt of the suite, development split):

- end to end, per prompt length: time to first token and decode ms/token under `dense` (plain SDPA
  through the same registry, windows applied), `noop` (attention returns the queries: the floor of
  this stack) and `dam` (the profile with its recommended run-time options), with the decode loop of
  `dam generate` (`--cuda-graph`: its static-cache graph loop);
- each global layer alone: its real q, k, v at that length (recorded in a dense prefill), timed with
  `sparse_attention` (the profile's dynamic part included) against dense causal SDPA, plus the density
  DAM really kept there (static mask united with the blocks the selection picked from those q, k).

    python benchmarks/long_context.py --model gemma3-270m --profile profiles/gemma3-270m.safetensors \
        --lengths 4096,8192,16384,32768 --cuda-graph --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from checkout import use_checkout  # noqa: E402  (beside this script)

use_checkout()

import generate as harness  # noqa: E402
from generate import bench_ms, environment, profile_prefill, register_noop, run_e2e, set_variant, sync  # noqa: E402

from dam_cli.artifact.profile import load_profile  # noqa: E402
from dam_cli.runtime import backend as dam_backend  # noqa: E402
from dam_cli.runtime.decode import graph_decode_loop  # noqa: E402

RECORD_IMPL = "bench_record"


def global_layers(config) -> list[int]:
    """Layers without a sliding window (all layers when the config names no layer types)."""
    text = getattr(config, "text_config", None) or config
    types = getattr(text, "layer_types", None)
    if not types:
        return list(range(text.num_hidden_layers))
    return [i for i, t in enumerate(types) if t != "sliding_attention"]


def record_qkv(model, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple]:
    """Post-rotary q, k, v and the attention scale of `layers` in one dense prefill of `ids`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from dam_cli.runtime.backend import dam_mask

    seen: dict[int, tuple] = {}

    def forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
        from dam_cli.runtime.backend import dense_attention_forward

        if int(module.layer_idx) in layers:
            seen[int(module.layer_idx)] = (query.clone(), key.clone(), value.clone(), scaling)
        return dense_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register(RECORD_IMPL, forward)
    AttentionMaskInterface.register(RECORD_IMPL, dam_mask)
    dam_backend.enable_dense(model)  # the dense forward's per-layer state (windows, soft-cap)
    model.set_attn_implementation(RECORD_IMPL)
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        dam_backend.disable_dam(model)
        model.set_attn_implementation("sdpa")
    return seen


def global_attention(profile, dyn, qkv: dict[int, tuple], device: str) -> list[dict]:
    """Per global layer: dense vs DAM prefill and one-row decode times, and the density DAM kept."""
    from dam_kernels.dynamic import select_blocks, static_block_counts, union_pair_counts

    from dam_cli.runtime.attention import sparse_attention

    F = torch.nn.functional
    rows = []
    for layer, (q, k, v, scale) in sorted(qkv.items()):
        S = q.shape[2]
        q1 = q[:, :, -1:].contiguous()
        gqa = k.shape[1] != q.shape[1]
        row = {"layer": layer, "tokens": S}
        row["dense_prefill_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(  # noqa: B023
            q, k, v, is_causal=True, scale=scale, enable_gqa=gqa), device)  # noqa: B023
        row["dam_prefill_ms"] = bench_ms(lambda: sparse_attention(  # noqa: B023
            q, k, v, profile, layer, scale=scale, dynamic=dyn), device)  # noqa: B023
        row["dense_decode_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(  # noqa: B023
            q1, k, v, scale=scale, enable_gqa=gqa), device)  # noqa: B023
        row["dam_decode_ms"] = bench_ms(lambda: sparse_attention(  # noqa: B023
            q1, k, v, profile, layer, start=S - 1, scale=scale, dynamic=dyn), device)  # noqa: B023
        total = S * (S + 1) / 2
        static = static_block_counts(lambda r, n: profile.mask_rows(layer, r, n), S,  # noqa: B023
                                     dyn.block if dyn else 64)  # on the CPU, as union_pair_counts wants
        row["static_density"] = float(static.sum((-1, -2)).double().mean() / total)
        if dyn is not None:
            chosen = select_blocks(q, k, 0, dyn.topk, dyn.block, tail_topk=dyn.tail_topk, score=dyn.score,
                                   tail_mass=dyn.tail_mass, mass=dyn.mass, scale=scale)
            pairs = union_pair_counts(chosen, static, S, dyn.block)[0]
            row["density"] = float(pairs.double().mean() / total)
        else:
            row["density"] = row["static_density"]
        row["prefill_speedup"] = row["dense_prefill_ms"] / row["dam_prefill_ms"]
        row["decode_speedup"] = row["dense_decode_ms"] / row["dam_decode_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def trace_layer(profile, dyn, qkv: dict[int, tuple], out: str) -> None:
    """torch.profiler tables (CUDA time per kernel) of the first recorded layer's DAM prefill and decode."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from dam_cli.runtime.attention import sparse_attention

    layer, (q, k, v, scale) = min(qkv.items())
    S = q.shape[2]
    q1 = q[:, :, -1:].contiguous()
    calls = {"prefill": lambda: sparse_attention(q, k, v, profile, layer, scale=scale, dynamic=dyn),
             "decode": lambda: sparse_attention(q1, k, v, profile, layer, start=S - 1, scale=scale, dynamic=dyn)}
    for name, fn in calls.items():
        fn()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        with open(os.path.join(out, f"trace-layer{layer}-{S}-{name}.txt"), "w") as f:
            f.write(f"layer {layer}, {S} tokens, {name}, 5 calls\n{table}\n")
        print(f"trace of layer {layer} {name} at {S}:\n{table}", flush=True)


def prompt_ids(tokenizer, S: int, device: str) -> torch.Tensor:
    """A real single-needle suite prompt of at most S tokens (development split), completion form."""
    from dam_cli.evaluation.suite.splits import suite_prompts

    p = suite_prompts(tokenizer, S, "development", 1, tasks=["niah_single"], chat=False)[0]
    return torch.tensor([p.ids], device=device)


def render(results: dict) -> str:
    lines = [f"{results['env']}", f"model: {results['model']}; profile: {results['profile']}; dynamic: "
             f"{results['dynamic']}; loop: {'CUDA graph' if results['cuda_graph'] else 'dynamic cache'}", "",
             "| prompt tokens | dense TTFT / decode | no-op TTFT / decode | DAM TTFT / decode | TTFT dense/DAM "
             "| decode dense/DAM |", "|---|---|---|---|---|---|"]

    def cell(r):
        return "-" if r is None or "error" in r else f"{r['ttft_s']:.3f} s / {r['decode_steady_ms']:.2f} ms"

    for row in results["rows"]:
        d, n, m = row.get("dense"), row.get("noop"), row.get("dam")
        ok = d and m and "error" not in d and "error" not in m
        lines.append(f"| {row['tokens']:,} | {cell(d)} | {cell(n)} | {cell(m)} | "
                     f"{d['ttft_s'] / m['ttft_s']:.2f}x | {d['decode_steady_ms'] / m['decode_steady_ms']:.2f}x |"
                     if ok else f"| {row['tokens']:,} | {cell(d)} | {cell(n)} | {cell(m)} | - | - |")
    lines += ["", "Global layers alone (real q, k, v):", "",
              "| tokens | layer | DAM density | dense prefill ms | DAM prefill ms | speed-up | dense decode ms "
              "| DAM decode ms | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["global_layers"]:
        lines.append(f"| {r['tokens']:,} | {r['layer']} | {100 * r['density']:.1f}% | {r['dense_prefill_ms']:.3f} | "
                     f"{r['dam_prefill_ms']:.3f} | {r['prefill_speedup']:.2f}x | {r['dense_decode_ms']:.4f} | "
                     f"{r['dam_decode_ms']:.4f} | {r['decode_speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    from dam_cli.runtime.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model spec as `dam generate --model` takes it")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--variants", default="dense,noop,dam")
    ap.add_argument("--dynamic", default="profile", choices=("profile", "recommended", "off"),
                    help="the dam variant's dynamic part: the profile's run-time options, the recommended recipe's, "
                    "or none")
    ap.add_argument("--score", default=None, help="replace the dynamic part's block score (e.g. antidiag)")
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--trace", action="store_true", help="also write torch.profiler tables of the first global "
                    "layer's DAM prefill and one-row decode (trace-layer*.txt): where their time goes")
    ap.add_argument("--trace-prefill", default="", help="variants (e.g. dense,dam) whose whole prefill at each length "
                    "is traced with torch.profiler (trace-prefill-VARIANT-LENGTH.txt)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.cuda_graph:
        harness.LOOP[0] = graph_decode_loop
    env = environment(device)
    print(json.dumps(env), flush=True)
    t0 = time.perf_counter()
    lm = load_model(args.model, device=device, dtype=dtype)
    model = lm.model
    profile = load_profile(args.profile)
    if args.dynamic == "recommended":
        from dam_kernels.selection import DynamicSelection

        from dam_cli.profiling.recipes import RECIPE_RUNTIME, RECOMMENDED

        dyn = DynamicSelection(**RECIPE_RUNTIME[RECOMMENDED]["dynamic"]).validate()
    else:
        dyn = dam_backend.recommended_dynamic(profile) if args.dynamic == "profile" else None
    if dyn is not None and args.score:
        from dataclasses import replace

        dyn = replace(dyn, score=args.score).validate()
    harness.DYNAMIC[0] = dyn
    register_noop()
    dam_backend.register()
    be = "triton" if device == "cuda" else "auto"
    glob = global_layers(model.config)
    print(f"loaded in {time.perf_counter() - t0:.1f} s; global layers {glob}; dynamic {dyn}", flush=True)
    results = {"env": env, "model": lm.identity.get("name"), "profile": os.path.basename(args.profile),
               "dynamic": None if dyn is None else [dyn.topk, dyn.block, dyn.tail_topk, dyn.score, dyn.tail_mass],
               "cuda_graph": args.cuda_graph, "new_tokens": args.new_tokens, "rows": [], "global_layers": []}
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(args.out, "bench-long-context.json")
    for S in [int(x) for x in args.lengths.split(",")]:
        ids = prompt_ids(lm.tokenizer, S, device)
        row = {"tokens": int(ids.shape[1])}
        for name in args.variants.split(","):
            try:
                set_variant(model, name, profile, be)
                row[name] = run_e2e(model, ids, args.new_tokens, device)
            except Exception as e:  # one failure must not lose the other numbers
                row[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            finally:
                dam_backend.disable_dam(model)
                model.set_attn_implementation("sdpa")
            print(json.dumps({"tokens": row["tokens"], "variant": name, **row[name]}), flush=True)
        for name in [v for v in args.trace_prefill.split(",") if v] if device == "cuda" else []:
            try:
                set_variant(model, name, profile, be)
                table = profile_prefill(model, ids)
                with open(os.path.join(args.out, f"trace-prefill-{name}-{row['tokens']}.txt"), "w") as f:
                    f.write(table)
                print(f"prefill trace of {name} at {row['tokens']}:\n{table}", flush=True)
            except Exception as e:  # a trace must not lose the numbers
                print(f"prefill trace of {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            finally:
                dam_backend.disable_dam(model)
                model.set_attn_implementation("sdpa")
        results["rows"].append(row)
        try:
            qkv = record_qkv(model, ids, glob)
            results["global_layers"] += global_attention(profile, dyn, qkv, device)
            if args.trace and device == "cuda":
                trace_layer(profile, dyn, qkv, args.out)
            del qkv
        except Exception as e:
            results["global_layers_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(results["global_layers_error"], flush=True)
        sync(device)
        if device == "cuda":
            torch.cuda.empty_cache()
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1)
    print()
    print(render(results))


if __name__ == "__main__":
    main()
