"""Batch throughput: DAM against dense attention at batch 1, 4 and 16, in tokens per second.

The model and profile are those of `benchmarks/generate.py` (imported from beside this file): a
Llama-3.2-1B-shaped model with random weights in bf16, and the source profile's heads tiled onto its
16 layers x 32 heads. Each batch holds `--batch` prompts of `--prompt-tokens` random tokens (equal lengths;
`--pad-spread N` shortens row b by about b * N / B tokens, so the batch is left-padded and DAM runs row by
row). Every variant generates `--new-tokens` tokens per row with the loop `dam generate` runs for JSON-lines
prompts (`dam_cli.runtime.decode.batch_decode_loop`; `--cuda-graph`: static cache and a CUDA graph), after a
warm-up at a prompt 128 tokens shorter; of two measured runs the second is reported, the first's times beside it
(per-shape caches, such as cuDNN's attention plans and DAM's block layouts, are cold in the first). Reported per
batch size and variant:

- prefill tokens/s: B x prompt tokens / time to the first ids;
- decode tokens/s: B x (new tokens - 1) / time from the first ids to the last;
- generated tokens/s: B x new tokens / (prefill + decode), what `dam generate` reports as throughput.

    python benchmarks/batch_throughput.py --out batch.json        # the H200 run: 32,768 tokens, batches 1,4,16
    python benchmarks/batch_throughput.py --recommended --profile profiles/smollm2-135m-instruct.safetensors
    python benchmarks/batch_throughput.py --preset tiny           # a CPU smoke run (256 tokens, 4 new tokens)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # beside this file, even under PYTHONSAFEPATH
import generate as bench  # noqa: E402, I001  (benchmarks/generate.py: the model, the tiled profile, the variants)
import torch  # noqa: E402
from dam_kernels.selection import DynamicSelection  # noqa: E402

from dam_cli.artifact.profile import load_profile  # noqa: E402
from dam_cli.runtime import backend as dam_backend  # noqa: E402
from dam_cli.runtime.decode import batch_decode_loop  # noqa: E402


def batch_inputs(B: int, S: int, spread: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids `[B, S]`, left-padding mask or None): row b has S - (b * spread) // B real tokens."""
    g = torch.Generator().manual_seed(S + B)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    if not spread or B == 1:
        return ids.to(device), None
    mask = torch.ones(B, S, dtype=torch.long)
    for b in range(B):
        mask[b, : (b * spread) // B] = 0
    return ids.to(device), mask.to(device)


def timed_run(model, ids: torch.Tensor, mask: torch.Tensor | None, new_tokens: int, device: str, graph: bool) -> dict:
    """One measured prefill + decode of the batch: times and throughputs."""
    B, S = ids.shape
    bench.sync(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []
    t0 = time.perf_counter()
    rows = batch_decode_loop(model, ids, mask, max_new_tokens=new_tokens, graph=graph,
                             on_step=lambda _ids: stamps.append(time.perf_counter()))
    bench.sync(device)
    ttft = stamps[0] - t0
    decode = stamps[-1] - stamps[0]
    steps = len(stamps) - 1
    real = int(mask.sum()) if mask is not None else B * S
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return {"ttft_s": ttft, "decode_s": decode, "steps": steps, "prompt_tokens": real,
            "decode_ms_per_step": 1000 * decode / max(steps, 1),
            "decode_median_ms": 1000 * gaps[len(gaps) // 2] if gaps else float("nan"),
            "prefill_tokens_per_s": real / ttft, "decode_tokens_per_s": B * steps / decode if decode > 0 else None,
            "generated_tokens_per_s": B * len(stamps) / (ttft + decode),
            "new_tokens_per_row": max(len(r.tokens) for r in rows),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None}


def run_batch(model, ids: torch.Tensor, mask: torch.Tensor | None, new_tokens: int, device: str,
              graph: bool) -> dict:
    """Warm up at a prompt 128 tokens shorter (3 tokens), then two measured runs: the second is reported
    (the steady state: per-shape caches such as cuDNN's plans and DAM's layouts filled), the first beside it."""
    cut = min(128, ids.shape[1] - 1) if mask is None else 0  # a padded batch warms up at full length
    batch_decode_loop(model, ids[:, cut:], None if mask is None else mask[:, cut:], max_new_tokens=3, graph=graph)
    first = timed_run(model, ids, mask, new_tokens, device, graph)
    warm = timed_run(model, ids, mask, new_tokens, device, graph)
    return {**warm, "first_ttft_s": first["ttft_s"], "first_decode_ms_per_step": first["decode_ms_per_step"],
            "first_generated_tokens_per_s": first["generated_tokens_per_s"]}


def render(results: dict) -> str:
    """A markdown table of a results dict: per batch size, each variant's throughputs and DAM's ratio to dense."""
    env = results["env"]
    loop = "static cache + CUDA graph" if results["cuda_graph"] else "dynamic cache"
    lines = [f"{env}", f"preset {results['preset']}, {results['prompt_tokens']:,} prompt tokens per row "
             f"(pad spread {results['pad_spread']}), {results['new_tokens']} new tokens, {results['dtype']}, "
             f"DAM backend {results['backend']}, loop {loop}, DAM density {100 * results['density']:.2f}%, "
             f"profile {results['profile']}, dynamic {results['dynamic']}", "",
             "| batch | variant | TTFT s | decode ms/step | prefill tok/s | decode tok/s | generated tok/s | peak GiB "
             "| generated tok/s vs dense | first run: TTFT s / decode ms/step |", "|---" * 10 + "|"]
    for row in results["rows"]:
        dense = row.get("dense", {})
        for name in results["variants"]:
            r = row.get(name)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {row['batch']} | {name} | error: {r['error']} ||||||||")
                continue
            ratio = (f"{r['generated_tokens_per_s'] / dense['generated_tokens_per_s']:.2f}x"
                     if "generated_tokens_per_s" in dense else "-")
            dec = f"{r['decode_tokens_per_s']:,.0f}" if r["decode_tokens_per_s"] else "-"
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
            lines.append(f"| {row['batch']} | {name} | {r['ttft_s']:.3f} | {r['decode_ms_per_step']:.2f} | "
                         f"{r['prefill_tokens_per_s']:,.0f} | {dec} | {r['generated_tokens_per_s']:,.1f} | {peak} | "
                         f"{ratio} | {r['first_ttft_s']:.3f} / {r['first_decode_ms_per_step']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(bench.PRESETS), default="llama-1b")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="per row (default 32768; tiny: 256)")
    ap.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=None, help="per row (default 64; tiny: 4)")
    ap.add_argument("--variants", default="dense,dam", help="of sdpa, dense, noop, dam (benchmarks/generate.py)")
    ap.add_argument("--pad-spread", type=int, default=0, help="left-pad: row b is about b * N / B tokens shorter")
    ap.add_argument("--profile", default=bench.SHIPPED, help="source profile whose heads are tiled onto the model")
    off = DynamicSelection()
    ap.add_argument("--dynamic-topk", type=int, default=off.topk, help="dynamic part of the dam variant (0 = off)")
    ap.add_argument("--dynamic-block", type=int, default=off.block)
    ap.add_argument("--dynamic-tail-topk", type=int, default=off.tail_topk)
    ap.add_argument("--dynamic-score", default=off.score)
    ap.add_argument("--recommended", action="store_true", help="the dam variant takes the dynamic part the profile "
                    "recommends (dam.runtime), as `dam generate` does; the --dynamic-* flags are ignored")
    ap.add_argument("--cuda-graph", action="store_true", help="static cache and one CUDA graph per step "
                    "(equal-length batches only)")
    ap.add_argument("--device", default=None, help="default: cuda when present (tiny: cpu)")
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = ap.parse_args()
    try:
        bench.DYNAMIC[0] = DynamicSelection(args.dynamic_topk, args.dynamic_block, args.dynamic_tail_topk,
                                            args.dynamic_score).validate(cli=True)
    except ValueError as e:
        ap.error(str(e))
    tiny = args.preset == "tiny"
    device = args.device or ("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    be = "reference" if device == "cpu" else "triton"
    S = args.prompt_tokens or (256 if tiny else 32768)
    new_tokens = args.new_tokens or (4 if tiny else 64)
    batches = [int(x) for x in args.batches.split(",")]
    variants = args.variants.split(",")
    if args.cuda_graph and args.pad_spread:
        ap.error("--cuda-graph decodes equal-length batches only: drop --pad-spread")

    env = bench.environment(device)
    print(json.dumps(env), flush=True)
    model = bench.build_model(args.preset, device, dtype)
    src = load_profile(args.profile)
    profile = bench.tiled_profile(src, model)
    if args.recommended:
        bench.DYNAMIC[0] = dam_backend.recommended_dynamic(src) or DynamicSelection()
    bench.register_noop()
    dam_backend.register()
    d = bench.DYNAMIC[0]
    results: dict = {"env": env, "preset": args.preset, "prompt_tokens": S, "new_tokens": new_tokens,
                     "pad_spread": args.pad_spread, "dtype": str(dtype), "backend": be, "cuda_graph": args.cuda_graph,
                     "profile": os.path.basename(args.profile), "density": float(profile.density(S).mean()),
                     "dynamic": [d.topk, d.block, d.tail_topk, d.score], "variants": variants, "rows": []}

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    for B in batches:
        ids, mask = batch_inputs(B, S, args.pad_spread, model.config.vocab_size, device)
        row: dict = {"batch": B}
        for name in variants:
            try:
                bench.set_variant(model, name, profile, be)
                dam_backend.reset_seen(model)
                row[name] = run_batch(model, ids, mask, new_tokens, device, args.cuda_graph)
                if name in ("dense", "dam"):
                    dam_backend.check_routed(model)
            except Exception as e:  # record and go on: one failure (out of memory) must not lose the others
                import traceback

                traceback.print_exc()
                row[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            finally:
                dam_backend.disable_dam(model)
                model.set_attn_implementation("sdpa")
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            print(json.dumps({"batch": B, "variant": name, **row[name]}), flush=True)
        results["rows"].append(row)
        save()
        del ids, mask
    print()
    print(render(results))


if __name__ == "__main__":
    main()
